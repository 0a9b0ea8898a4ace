"""`python -m xqinfer` runs the command-line interface."""

from .cli import main

main()
