"""One module per command (lora_train, merge, markers, eval, bench, generate, ablate, report): each
wires the layers below into what the command does. peftko.cli parses the flags and calls them."""
