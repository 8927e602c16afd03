"""lm: from raw text to a small GPT you can train, sample from and look inside.

The library computes and returns data; it never prints. The command-line front end lives in `cli/`.
Importing `lm` is cheap on purpose: heavy modules (torch, tokenizers) are imported by the submodules
that need them, so `lm --help` answers at once.
"""

__version__ = "0.1.0"
