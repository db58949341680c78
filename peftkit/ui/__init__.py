"""`peftkit ui`: a local web page over the library and the CLI, with no second implementation of either.

    plan.py      the New-run form's fields (the declared options of `peftkit train`), the command and recipe a
                 filled form means, through the CLI's own option handling
    preview.py   the memory estimate and the tokenized training examples (trained / masked tokens)
    runs.py      runs as separate `peftkit train` processes, found again from their run folders
    tryit.py     an adapter's streamed answer beside its base model's
    ship.py      merge / export / check as CLI commands, their output streamed; uploads of data files
    security.py  loopback-only hosts, the token, cross-site refusal, paths confined to the runs root
    server.py    the Starlette app; static/ holds the page (HTML, CSS, JS, and uPlot for the charts)
"""
