"""Run the peftkit CLI from a checkout: `python cli.py train --method lora --rank 8`."""

from peftkit.cli import main

if __name__ == "__main__":
    main()
