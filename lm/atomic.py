"""Writing files so that a crash never leaves a half-written file in place of a good one.

Everything is written to a temporary file beside the target, flushed to disk, then renamed over the
target: `os.replace` is atomic on POSIX and Windows, so readers see the old file or the new one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from lm.errors import OutputError


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates files readable by their owner only; finished files get the usual permissions.
FILE_MODE = 0o666 & ~_current_umask()


def prepare_output(path: Path, *, overwrite: bool, what: str = "output", flag: str = "--force") -> None:
    """Fail early, before any work, if `path` cannot be written: exists, is a folder, or is not writable.

    Missing parent folders are created, as users expect of `--out runs/new/tokenizer.json`.
    """
    if path.is_dir():
        raise OutputError(f"{what} {path} is a folder; give a file path")
    if path.exists() and not overwrite:
        raise OutputError(f"{what} {path} exists; pass {flag} to overwrite it or choose another path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise OutputError(f"cannot write {what} {path}: {reason}; choose a writable path") from None


@contextlib.contextmanager
def atomic_open(path: Path, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside `path`; on a clean exit it replaces `path`, on an error it vanishes."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open writes only, got mode {mode!r}")
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, FILE_MODE)
        text_args = {"encoding": "utf-8", "newline": ""} if mode == "w" else {}
        with os.fdopen(fd, mode, **text_args) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` as UTF-8 to `path` atomically."""
    with atomic_open(path, "w") as handle:
        handle.write(text)
