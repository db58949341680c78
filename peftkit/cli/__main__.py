"""`python -m peftkit.cli ...` runs the CLI (same as the `peftkit` console script)."""

from peftkit.cli import main

main()
