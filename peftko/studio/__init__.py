"""`peftko studio`: the whole loop in a local web page (Starlette + uvicorn, one page of plain HTML/JS).

The studio sits above the commands: it reads run folders (peftko.run.records) and corpora
(peftko.corpus) and drives the command line itself as child processes (peftko.studio.jobs), so the
run folders stay the single source of truth. Needs pip install 'peftko[studio]'.
"""
