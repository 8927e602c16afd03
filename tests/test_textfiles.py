from __future__ import annotations

from pathlib import Path

import pytest

from lm import textfiles
from lm.errors import InputError
from lm.textfiles import find_text_files, hold_out_tail, iter_text_chunks


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def test_folder_is_walked_recursively_in_order_skipping_hidden_and_binary(tmp_path: Path) -> None:
    write(tmp_path / "b.txt", "bee\n")
    write(tmp_path / "a" / "deep" / "c.md", "sea\n")
    write(tmp_path / ".git" / "config", "[core]\n")
    write(tmp_path / ".hidden.txt", "secret\n")
    write(tmp_path / "image.png", b"\x89PNG\r\n\x1a\n\x00\x00")
    write(tmp_path / "empty.txt", b"")
    found = find_text_files([tmp_path])
    assert found.files == [tmp_path / "a" / "deep" / "c.md", tmp_path / "b.txt"]
    assert found.total_bytes == 8
    assert {p.name for p, _ in found.skipped} == {"image.png", "empty.txt"}


def test_excluded_files_are_left_out(tmp_path: Path) -> None:
    keep = write(tmp_path / "notes.txt", "words\n")
    write(tmp_path / "tokenizer.json", '{"model": {}}\n')
    assert find_text_files([tmp_path], exclude=[tmp_path / "tokenizer.json"]).files == [keep]


def test_glob_and_repeats(tmp_path: Path) -> None:
    one = write(tmp_path / "one.txt", "1\n")
    two = write(tmp_path / "sub" / "two.txt", "2\n")
    write(tmp_path / "three.md", "3\n")
    found = find_text_files([str(tmp_path / "**" / "*.txt"), one])
    assert found.files == [one, two]


@pytest.mark.parametrize(("make", "message"), [
    (lambda d: d / "missing.txt", "does not exist"),
    (lambda d: write(d / "empty.txt", b""), "is empty"),
    (lambda d: write(d / "latin1.txt", "café".encode("latin-1")), "is not UTF-8 text"),
    (lambda d: write(d / "utf16.txt", "hello".encode("utf-16-le")), "looks binary"),
    (lambda d: d / "*.nothing", "no files match"),
])
def test_named_inputs_that_cannot_work(tmp_path: Path, make, message: str) -> None:
    with pytest.raises(InputError, match=message):
        find_text_files([make(tmp_path)])


def test_folders_with_nothing_to_read(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="has no files"):
        find_text_files([tmp_path / "empty"])
    write(tmp_path / "binary" / "x.bin", b"\xff\xfe\x00")
    with pytest.raises(InputError, match="no text found"):
        find_text_files([tmp_path / "binary"])


def test_chunks_join_back_to_the_text_crlf_kept_bom_dropped(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(textfiles, "CHUNK_BYTES", 16)
    text = "first\r\nsecond\n\nthird line, longer than a chunk\n\nno newline at the end: 日本"
    path = write(tmp_path / "t.txt", b"\xef\xbb\xbf" + text.encode())
    consumed: list[int] = []
    chunks = list(iter_text_chunks([path], on_bytes=consumed.append))
    assert "".join(chunks) == text
    assert all(chunk.endswith("\n") for chunk in chunks[:-1])  # whole lines only
    assert len(chunks) > 3
    assert sum(consumed) == path.stat().st_size


def test_long_lines_come_in_bounded_pieces_even_inside_a_character(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(textfiles, "MAX_LINE_CHARS", 7)
    monkeypatch.setattr(textfiles, "CHUNK_BYTES", 7)
    text = "日本語のテキスト" * 5 + "\nshort\n"  # 3-byte characters, cut at every 7 bytes
    path = write(tmp_path / "long.txt", text)
    pieces = list(iter_text_chunks([path]))
    assert "".join(pieces) == text
    # A piece holds at most the longest line allowed plus one read's worth.
    assert max(len(p) for p in pieces) <= 7 + 7 + 2  # plus a character held back by the decoder
    assert len(pieces) >= len(text) // 16


def test_invalid_utf8_after_the_sniffed_head_is_reported_with_its_offset(tmp_path: Path) -> None:
    good = "a" * (textfiles.SNIFF_BYTES + 10) + "\n"
    path = write(tmp_path / "late.txt", good.encode() + b"bad \xff byte\n")
    found = find_text_files([path])  # the head looks fine
    with pytest.raises(InputError, match=rf"late.txt is not UTF-8 text \(byte 0xff near offset {len(good) + 4}\)"):
        list(iter_text_chunks(found.files))


def test_truncated_character_at_the_end(tmp_path: Path) -> None:
    path = write(tmp_path / "cut.txt", "ok 日".encode()[:-1])
    with pytest.raises(InputError, match="ends inside a UTF-8 character"):
        list(iter_text_chunks([path]))


@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.5, 0.9])
def test_held_out_tail_is_cut_at_a_line_end_and_loses_nothing(tmp_path: Path, fraction: float) -> None:
    (tmp_path / "a.txt").write_text("".join(f"line {i} of a, ünïcode\n" for i in range(40)), encoding="utf-8")
    (tmp_path / "b.txt").write_text("".join(f"b{i}\n" for i in range(30)), encoding="utf-8")
    sources = find_text_files([tmp_path])
    train, val = hold_out_tail(sources, fraction)
    def text(parts: list) -> str:
        return "".join(iter_text_chunks(parts))

    assert text(train.parts) + text(val.parts) == text(sources.parts)
    assert text(train.parts).endswith("\n") and val.total_bytes + train.total_bytes == sources.total_bytes
    assert abs(val.total_bytes - fraction * sources.total_bytes) < 30  # within a line of the fraction


def test_held_out_tail_of_one_long_final_line_cuts_before_it(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text("short\n" + "x" * 100 + "\n", encoding="utf-8")
    train, val = hold_out_tail(find_text_files([path]), 0.1)
    assert "".join(iter_text_chunks(val.parts)) == "x" * 100 + "\n" and train.total_bytes == 6
    with pytest.raises(InputError, match="cannot be split into training and 10% validation"):
        hold_out_tail(find_text_files([write(tmp_path / "one.txt", "a single line\n")]), 0.1)

