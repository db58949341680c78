"""The core layer: what every method builds on and every operation acts through.

`method` (the `Method` and `AdapterLayer` bases), `registry` (name -> method), `state` (everything peftkit keeps on
a model), `archs` (per-architecture module names), `inject` (target matching and injection), `ops` (switch,
disable, merge, delete) and `counting` (parameter counts on the meta device). It imports nothing of peftkit but
`peftkit.errors`; methods, io, training and the CLI import it.
"""
