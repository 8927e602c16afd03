"""`python -m lm ...` runs the `lm` command (torchrun starts training processes this way)."""

from lm.cli.main import main

main()
