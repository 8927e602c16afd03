"""lm: from raw text to a small GPT you can train, sample from and look inside.

The library computes and returns data; it never prints. The command-line front end is `lm.cli`: in the
source tree its folder is `cli/`, beside this one, and the wheel installs it as `lm/cli/` (see
pyproject.toml), so `lm` is the only top-level package an install adds. Importing `lm` is cheap on
purpose: heavy modules (torch, tokenizers) are imported by the submodules that need them, so `lm --help`
answers at once.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"


class _SourceTreeCli(importlib.abc.MetaPathFinder):
    """Finds `lm.cli` in the source tree's `cli/` folder, for a checkout imported by path (PYTHONPATH=.,
    as `make gpu-check VENV=` runs it). Installed, editable or not, the install maps it itself."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def find_spec(self, fullname: str, path: object = None,
                  target: object = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != "lm.cli":
            return None
        return importlib.util.spec_from_file_location(fullname, self.folder / "__init__.py",
                                                      submodule_search_locations=[str(self.folder)])


def _find_cli_in_source_tree() -> None:
    here = Path(__file__).resolve().parent
    source_cli = here.parent / "cli"
    if not (here / "cli").is_dir() and (source_cli / "__init__.py").is_file():
        sys.meta_path.append(_SourceTreeCli(source_cli))


_find_cli_in_source_tree()
