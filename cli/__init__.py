"""The `lm` command-line front end: parses flags, calls the library in `lm/`, renders with rich.

Modules here import only typer and the standard library at the top; the library (and with it torch
or tokenizers) is imported inside each command, so `lm --help` stays instant.
"""
