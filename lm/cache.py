"""Where lm keeps what it can rebuild: downloads and tokenized corpora."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$LM_CACHE_DIR, else $XDG_CACHE_HOME/lm, else ~/.cache/lm."""
    if explicit := os.environ.get("LM_CACHE_DIR"):
        return Path(explicit).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lm"
