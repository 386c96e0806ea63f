from peftko.cli import main

main()
