from __future__ import annotations

from pathlib import Path

import pytest

from lm.atomic import atomic_open, atomic_write_text, prepare_output
from lm.errors import OutputError


def test_prepare_output_checks_before_any_work(tmp_path: Path) -> None:
    prepare_output(tmp_path / "new" / "deeper" / "file.json", overwrite=False)
    assert (tmp_path / "new" / "deeper").is_dir()
    assert list((tmp_path / "new" / "deeper").iterdir()) == []  # the write probe leaves nothing
    existing = tmp_path / "x.json"
    existing.write_text("keep")
    with pytest.raises(OutputError, match="exists; pass --force"):
        prepare_output(existing, overwrite=False)
    prepare_output(existing, overwrite=True)
    with pytest.raises(OutputError, match="is a folder"):
        prepare_output(tmp_path, overwrite=True)
    with pytest.raises(OutputError, match="cannot write"):
        prepare_output(existing / "under_a_file.json", overwrite=False)


def test_a_crash_mid_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "model.json"
    atomic_write_text(target, "good")
    with pytest.raises(RuntimeError), atomic_open(target, "w") as handle:
        handle.write("half of a new")
        raise RuntimeError("power cut")
    assert target.read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["model.json"]
    atomic_write_text(target, "better\r\n")
    assert target.read_bytes() == b"better\r\n"
