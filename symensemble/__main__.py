"""``python -m symensemble`` runs the command line."""

from .cli import main

main()
