"""``python -m pipeline.cli``: the ``zsad`` command."""

from pipeline.cli import main

main()
