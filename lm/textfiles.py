"""Finding the user's corpus and reading it as documents: the one reader every consumer uses.

A PATH given on the command line is a file, a folder (every usable file in it, recursively, hidden
ones left out) or a glob pattern. The format follows the file's name:

- plain text (any other name): the whole file is one document;
- `.txt.gz` (any `.gz` but the JSON Lines ones): the same, gzip-compressed;
- `.jsonl`, `.json`, `.ndjson` (and the same with `.gz`): JSON Lines, one object per line, each
  record's text field (`--text-field`, default `text`) one document;
- `.parquet`: each row's text column one document (needs pyarrow: `pip install 'lm-from-text[parquet]'`).

Training, tokenizer training, encoding and scoring all read through `iter_pieces`, so a JSON Lines
record is read exactly as a text file holding its text would be, and each document is followed by
<|endoftext|> downstream. Files are streamed in chunks of whole lines and records one at a time, so
memory does not grow with the corpus. A record that is not JSON, lacks the field or holds something
other than a string is counted and skipped (`RecordProblems` keeps the first file:line); reading
fails only when no record at all is usable.

Records that hold more than text (a conversation's list of messages, read by `lm.chat`) come through
`iter_record_values`: the same files and parts, the field's value handed over for the caller to judge.

Files named directly must be readable in their format; files found while walking a folder are kept
only if they look like text (or are a known record or compressed format), so a stray image in
`data/` is skipped and reported.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import json
import math
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lm.errors import InputError

SNIFF_BYTES = 8192
# Small chunks keep memory flat: tokenizers' trainer buffers 256 items from a Python iterator at a time.
CHUNK_BYTES = 1 << 12
# Longest line kept whole: a file with no newlines is still read in bounded pieces.
MAX_LINE_CHARS = 1 << 20
GLOB_CHARS = frozenset("*?[")
TEXT_FIELD = "text"
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".zip", ".tar", ".bz2", ".xz", ".zst", ".7z")
PARQUET_BATCH_ROWS = 1024
PARQUET_INSTALL = "pip install 'lm-from-text[parquet]'"

# Formats: how a file holds documents. Only TEXT and JSONL can be entered at a byte offset; the others
# are addressed by record (line of the decompressed stream, or Parquet row) when a part of one is needed.
TEXT, TEXT_GZ, JSONL, JSONL_GZ, PARQUET = "text", "text.gz", "jsonl", "jsonl.gz", "parquet"
RECORD_FORMATS = frozenset({JSONL, JSONL_GZ, PARQUET})


def file_format(path: Path) -> str:
    """The format a file is read in, from its name (see the module docstring)."""
    name = path.name.lower()
    if name.endswith(".parquet"):
        return PARQUET
    if name.endswith(".gz"):
        return JSONL_GZ if name[:-3].endswith(JSON_SUFFIXES) else TEXT_GZ
    return JSONL if name.endswith(JSON_SUFFIXES) else TEXT


@dataclass(frozen=True)
class TextPart:
    """Bytes `start` to `end` of a file: a whole file, or the piece on one side of a held-out cut.

    Compressed and Parquet files cannot be entered at a byte offset: a piece of one names its records
    instead (`records`: lines of the decompressed text, or Parquet rows, first to last + 1), and
    `start`/`end` then share the file's bytes out in proportion, for sizes and progress.
    """

    path: Path
    start: int
    end: int
    records: tuple[int, int] | None = None

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def format(self) -> str:
        return file_format(self.path)


@dataclass
class TextFiles:
    """The files a set of PATH arguments resolved to, in a stable order.

    A text part is one document; a JSON Lines or Parquet part holds one document per record.
    `text_field` names the field (or column) records keep their text in.
    """

    parts: list[TextPart]
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    text_field: str = TEXT_FIELD

    @property
    def files(self) -> list[Path]:
        return [part.path for part in self.parts]

    @property
    def sizes(self) -> list[int]:
        return [part.size for part in self.parts]

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes)

    @property
    def has_records(self) -> bool:
        return any(part.format in RECORD_FORMATS for part in self.parts)


# Names a record ("file.jsonl:17"); a function because finding a line number in a part that starts
# inside a file costs a read of the file up to it, which only the first bad record needs.
Where = Callable[[], str]


@dataclass
class RecordProblems:
    """Records that could not be read (not JSON, no such field, not a string), counted as they are met."""

    bad: int = 0
    good: int = 0  # documents read: records, and text parts
    first: str = ""  # where and why the first bad record was bad: "file.jsonl:17: not JSON"

    def add_bad(self, where: str | Where, why: str, count: int = 1) -> None:
        """Count `count` bad records; `where` may be a function, called only for the first one."""
        if not self.bad:
            self.first = f"{where() if callable(where) else where}: {why}"
        self.bad += count


def find_text_files(specs: Sequence[str | Path], exclude: Sequence[Path] = (),
                    text_field: str = TEXT_FIELD) -> TextFiles:
    """Resolve files, folders and globs to a list of readable, non-empty corpus files.

    `exclude` names files to leave out, such as the command's own output from an earlier run sitting
    in the folder being read. Raises `InputError` for a path that does not exist, a glob that matches
    nothing, a named file that is empty or not readable in its format, or when nothing is left at all.
    """
    if not specs:
        raise InputError("no input given; pass one or more text files, folders or glob patterns")
    if not text_field:
        raise InputError("--text-field is empty; name the field that holds each record's text (e.g. text)")
    excluded = {p.resolve() for p in exclude}
    chosen: dict[Path, None] = {}  # an ordered set: the same file named twice is read once
    skipped: list[tuple[Path, str]] = []
    for spec in specs:
        for path, named in _expand(str(spec)):
            if path.resolve() in excluded:
                continue
            problem = _text_problem(path)
            if problem is None:
                chosen[path] = None
            elif named:
                raise InputError(f"{path} {problem}; {_fix_for(problem)}")
            else:
                skipped.append((path, problem))
    if not chosen:
        raise InputError(f"no text found in {', '.join(map(str, specs))} "
                         f"({_describe_skips(skipped)}); point at UTF-8 text, JSON Lines or Parquet files")
    return TextFiles([TextPart(p, 0, p.stat().st_size) for p in chosen], skipped=skipped, text_field=text_field)


def hold_out_tail(sources: TextFiles, fraction: float) -> tuple[TextFiles, TextFiles]:
    """Split the text in two at a line end: (about the first 1 - `fraction` of the bytes, the rest).

    The cut is the first line end at or after that many bytes (the last one before it when the text
    ends first), so no line, no JSON Lines record and no UTF-8 character is cut in half; a text file
    cut in two gives one document on each side. In a compressed or Parquet file, which cannot be
    entered at a byte, the cut falls between whole records (lines or rows) at the same proportion.
    Raises `InputError` when one side would be empty.
    """
    target = round(sources.total_bytes * (1 - fraction))
    seen = 0
    for index, part in enumerate(sources.parts):
        if seen + part.size > target:
            head, tail = _cut(part, part.start + target - seen, last=index == len(sources.parts) - 1)
            before = [*sources.parts[:index], *([head] if head is not None else [])]
            after = [*([tail] if tail is not None else []), *sources.parts[index + 1:]]
            if before and after:
                return (TextFiles(before, sources.skipped, sources.text_field),
                        TextFiles(after, text_field=sources.text_field))
            break
        seen += part.size
    raise InputError(f"{sources.total_bytes:,} bytes of text cannot be split into training and {fraction:.0%} "
                     "validation at a line end; give more text, or pass --val FILES")


def _cut(part: TextPart, offset: int, *, last: bool) -> tuple[TextPart | None, TextPart | None]:
    """`part` cut at a line (or record) boundary near `offset`: the pieces before and after, None if empty."""
    if part.format in (TEXT, JSONL) and part.records is None:
        cut = _line_end_after(part, offset)
        if cut == part.end and last:
            cut = _line_end_before(part, part.end - 1)
        return (TextPart(part.path, part.start, cut) if cut > part.start else None,
                TextPart(part.path, cut, part.end) if cut < part.end else None)
    first, stop = part.records if part.records is not None else (0, count_records(part.path))
    count = stop - first
    keep = min(count, math.ceil(count * (offset - part.start) / part.size))
    if keep == count and last:
        keep = count - 1
    if keep <= 0:
        return None, part
    middle = part.start + round(part.size * keep / count)
    return (TextPart(part.path, part.start, middle, (first, first + keep)),
            TextPart(part.path, middle, part.end, (first + keep, stop)) if keep < count else None)


DEFLATE_MAX_RATIO = 1032  # deflate never shrinks data more than this
GZIP_OVERHEAD = 64  # header and trailer bytes, generously


def text_bytes(sources: TextFiles) -> int:
    """About how many bytes of text `sources` hold once decompressed (what a default vocabulary is sized
    by): a gzip file's own record of its size, a Parquet file's text column before compression, other
    files' sizes as they are; a piece of a compressed file gets its share of the whole."""
    total = 0
    for part in sources.parts:
        on_disk = part.path.stat().st_size
        if on_disk:
            total += round(_file_text_bytes(part, sources.text_field, on_disk) * part.size / on_disk)
    return total


def _file_text_bytes(part: TextPart, column: str, on_disk: int) -> int:
    """The text in the whole file `part` is a piece of."""
    if part.format == PARQUET:
        metadata = _parquet_file(part.path).metadata
        chunks = (metadata.row_group(group).column(i)
                  for group in range(metadata.num_row_groups) for i in range(metadata.num_columns))
        return sum(chunk.total_uncompressed_size for chunk in chunks if chunk.path_in_schema == column)
    if part.format not in (TEXT_GZ, JSONL_GZ):
        return on_disk
    with part.path.open("rb") as handle:  # gzip ends with its (last member's) size mod 2^32
        handle.seek(-4, 2)
        recorded = int.from_bytes(handle.read(4), "little")
    while recorded * DEFLATE_MAX_RATIO + GZIP_OVERHEAD < on_disk:  # wrapped past 4 GiB
        recorded += 1 << 32
    return recorded


def count_records(path: Path) -> int:
    """Lines of a gzip file's text, or rows of a Parquet file (read from its footer)."""
    if file_format(path) == PARQUET:
        return _parquet_file(path).metadata.num_rows
    lines, last = 0, b"\n"
    with gzip.open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            lines += block.count(b"\n")
            last = block[-1:]
    return lines + (last != b"\n")


def _line_end_after(part: TextPart, offset: int) -> int:
    """The offset just after the first newline that ends at or after `offset` in `part`, else its end."""
    if offset <= part.start:
        return part.start
    with part.path.open("rb") as handle:
        position = offset - 1  # a cut right after a newline is already clean: look at the byte before it
        handle.seek(position)
        while position < part.end:
            block = handle.read(min(1 << 16, part.end - position))
            found = block.find(b"\n")
            if found >= 0:
                return position + found + 1
            position += len(block)
    return part.end


def _line_end_before(part: TextPart, offset: int) -> int:
    """The offset just after the last newline before `offset` in `part`, else its start."""
    with part.path.open("rb") as handle:
        end = offset
        while end > part.start:
            start = max(part.start, end - (1 << 16))
            handle.seek(start)
            found = handle.read(end - start).rfind(b"\n")
            if found >= 0:
                return start + found + 1
            end = start
    return part.start


def _expand(spec: str) -> list[tuple[Path, bool]]:
    """The files one PATH argument stands for, each with whether the user named it directly."""
    path = Path(spec).expanduser()
    if path.is_file():
        return [(path, True)]
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and not _is_hidden(p, path))
        if not found:
            raise InputError(f"folder {path} has no files; put text files in it or pass another path")
        return [(p, False) for p in found]
    if GLOB_CHARS & set(spec):
        matches = sorted(Path(m) for m in glob.glob(str(path), recursive=True) if Path(m).is_file())
        if not matches:
            raise InputError(f"no files match {spec}; check the pattern (quote it to stop the shell expanding it)")
        return [(p, True) for p in matches]
    if path.exists():
        raise InputError(f"{path} is not a regular file or folder; pass a text file or a folder of them")
    raise InputError(f"{path} does not exist; check the path")


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _text_problem(path: Path) -> str | None:
    """Why `path` is not a usable corpus file, judged from its first bytes, or None if it looks fine."""
    name = path.name.lower()
    if name.endswith(ARCHIVE_SUFFIXES):
        return "is an archive (lm reads text, .gz-compressed text or JSON Lines, and Parquet files)"
    kind = file_format(path)
    try:
        if kind == PARQUET:
            return _parquet_problem(path)
        with path.open("rb") as raw:
            head = raw.read(SNIFF_BYTES)
            if kind in (TEXT_GZ, JSONL_GZ) and head:
                raw.seek(0)
                with gzip.GzipFile(fileobj=raw) as unzipped:
                    head = unzipped.read(SNIFF_BYTES)
    except (gzip.BadGzipFile, EOFError, zlib.error):
        return "is not gzip data (its name ends in .gz)"
    except OSError as err:
        return f"cannot be read ({err.strerror})"
    if not head:
        return "is empty"
    try:
        # A character cut by the sniff window's end is not an error, the end of the file is.
        codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) < SNIFF_BYTES)
    except UnicodeDecodeError as err:
        return f"is not UTF-8 text (byte 0x{head[err.start]:02x} at offset {err.start})"
    if b"\x00" in head:
        return "looks binary (it contains NUL bytes)"
    if kind in (JSONL, JSONL_GZ) and head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
        return "is one JSON array, not JSON Lines (one object per line)"
    return None


def _parquet_problem(path: Path) -> str | None:
    with path.open("rb") as handle:
        magic = handle.read(4)
    if not magic:
        return "is empty"
    if magic != b"PAR1":
        return "is not a Parquet file (its name ends in .parquet)"
    _parquet_file(path)  # says how to install pyarrow when it is missing
    return None


def _parquet_file(path: Path) -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(f"reading {path} needs pyarrow; install it with: {PARQUET_INSTALL}") from None
    try:
        return pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises its own ArrowInvalid on a damaged file
        raise InputError(f"{path} cannot be read as Parquet ({str(err).splitlines()[0]}); "
                         "check the file or leave it out") from None


def _fix_for(problem: str) -> str:
    if problem.startswith("is empty"):
        return "give a file with text in it"
    if problem.startswith("cannot be read"):
        return "check its permissions"
    if problem.startswith("is one JSON array"):
        return "write one object per line (e.g. jq -c '.[]' FILE > FILE.jsonl)"
    if problem.startswith(("is not gzip", "is not a Parquet", "is an archive")):
        return "rename it to what it holds, or extract it"
    return "convert it to UTF-8 text or leave it out"


def _describe_skips(skipped: list[tuple[Path, str]]) -> str:
    if not skipped:
        return "nothing to read"
    return f"skipped {len(skipped)} file(s), e.g. {skipped[0][0]} {skipped[0][1]}"


Piece = tuple[int, str, bool]  # (index of the part, text, whether the text ends a document)


def iter_pieces(sources: TextFiles | Sequence[Path | TextPart], on_bytes: Callable[[int], None] | None = None,
                problems: RecordProblems | None = None) -> Iterator[Piece]:
    """The documents of `sources`, in order, as pieces of whole lines of about `CHUNK_BYTES` each.

    Each piece is (index of its part, text, ends_document). A text part is one document; a JSON Lines
    or Parquet part gives one document per record, split into pieces exactly as a text file holding
    the record's text would be, so both encode to the same ids. `on_bytes(n)` is called as the
    files' bytes are consumed (compressed bytes for .gz files). Bad records are counted in `problems`
    and skipped; raises `InputError` when there were records and none was usable, or for text that
    is not UTF-8.
    """
    sources = _as_text_files(sources)
    problems = problems if problems is not None else RecordProblems()
    for index, part in enumerate(sources.parts):
        meter = _Meter(part.size, on_bytes)
        if part.format in RECORD_FORMATS:
            for text in _records(part, sources.text_field, meter, problems):
                problems.good += 1
                for piece in _pieces(_slices(text.encode("utf-8")), part.path, 0, strip_bom=False):
                    yield index, piece, False
                yield index, "", True
        else:
            blocks = _gzip_blocks(part, meter) if part.format == TEXT_GZ else _file_blocks(part, meter)
            for piece in _pieces(blocks, part.path, part.start, strip_bom=part.start == 0):
                yield index, piece, False
            problems.good += 1
            yield index, "", True
        meter.finish()
    if problems.bad and not problems.good:
        raise InputError(f"none of the {problems.bad:,} records is usable (first: {problems.first}); "
                         f"check --text-field (now {sources.text_field!r}) and the files' format")


def _as_text_files(sources: TextFiles | Sequence[Path | TextPart]) -> TextFiles:
    if isinstance(sources, TextFiles):
        return sources
    return TextFiles([item if isinstance(item, TextPart) else TextPart(item, 0, item.stat().st_size)
                      for item in sources])


def iter_text_chunks(sources: TextFiles | Sequence[Path | TextPart], on_bytes: Callable[[int], None] | None = None,
                     problems: RecordProblems | None = None) -> Iterator[str]:
    """The text of `sources` (whole files, parts of them, or their records' text) in pieces of whole lines.

    Joining the pieces of a text file gives its text back exactly (line endings kept). A line longer
    than `MAX_LINE_CHARS` is cut, so memory stays bounded whatever the input. A UTF-8 byte order mark
    at a file's start is dropped (it marks the encoding, it is not text). Raises `InputError` naming
    the file and offset of invalid UTF-8. See `iter_pieces` for the rest.
    """
    for _, text, _ in iter_pieces(sources, on_bytes, problems):
        if text:
            yield text


class _Meter:
    """Reports a part's bytes to `on_bytes` as the reading goes, exactly `total` of them by the end."""

    def __init__(self, total: int, on_bytes: Callable[[int], None] | None) -> None:
        self.total, self.on_bytes, self.reported = total, on_bytes, 0

    def add(self, n: int) -> None:
        self.to(self.reported + n)

    def fraction(self, done: float) -> None:
        self.to(round(self.total * min(1.0, done)))

    def to(self, done: int) -> None:
        done = min(done, self.total)
        if self.on_bytes is not None and done > self.reported:
            self.on_bytes(done - self.reported)
        self.reported = max(self.reported, done)

    def finish(self) -> None:
        self.to(self.total)


def _slices(data: bytes) -> Iterator[bytes]:
    """`data` in blocks of CHUNK_BYTES: how a file of these bytes would be read."""
    for start in range(0, len(data), CHUNK_BYTES):
        yield data[start:start + CHUNK_BYTES]


def _file_blocks(part: TextPart, meter: _Meter) -> Iterator[bytes]:
    with part.path.open("rb") as handle:
        handle.seek(part.start)
        left = part.size
        while left and (raw := handle.read(min(CHUNK_BYTES, left))):
            left -= len(raw)
            meter.add(len(raw))
            yield raw


def _gzip_blocks(part: TextPart, meter: _Meter) -> Iterator[bytes]:
    """The decompressed text of a .gz part in CHUNK_BYTES blocks (whole lines when only some lines are wanted)."""
    if part.records is not None:
        block = bytearray()
        for line in _gzip_lines(part, meter):
            block += line
            if len(block) >= CHUNK_BYTES:
                yield bytes(block)
                block.clear()
        if block:
            yield bytes(block)
        return
    with part.path.open("rb") as raw, gzip.GzipFile(fileobj=raw) as handle:
        while block := _read_gzip(handle, part.path):
            meter.to(raw.tell())
            yield block


def _read_gzip(handle: gzip.GzipFile, path: Path, line: bool = False) -> bytes:
    try:
        return handle.readline() if line else handle.read(CHUNK_BYTES)
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise InputError(f"{path} is damaged gzip data ({err or 'it ends too soon'}); "
                         "download or compress it again") from None


def _gzip_lines(part: TextPart, meter: _Meter) -> Iterator[bytes]:
    """The lines of a .gz part (all of them, or lines `records[0]` to `records[1]`)."""
    first, stop = part.records if part.records is not None else (0, math.inf)
    with part.path.open("rb") as raw, gzip.GzipFile(fileobj=raw) as handle:
        number = 0
        while number < stop and (line := _read_gzip(handle, part.path, line=True)):
            if number >= first:
                if part.records is None:
                    meter.to(raw.tell())
                else:
                    meter.fraction((number - first + 1) / (stop - first))
                yield line
            number += 1


def _pieces(blocks: Iterable[bytes], path: Path, offset: int, *, strip_bom: bool) -> Iterator[str]:
    """UTF-8 `blocks` as text in pieces that end at a line end (or after `MAX_LINE_CHARS`), joined losslessly."""
    decoder = codecs.getincrementaldecoder("utf-8-sig" if strip_bom else "utf-8")()
    pending = ""
    for raw in blocks:
        try:
            text = pending + decoder.decode(raw)
        except UnicodeDecodeError as err:
            raise _not_utf8(path, offset, err) from None
        offset += len(raw)
        cut = text.rfind("\n") + 1
        if cut == 0 and len(text) >= MAX_LINE_CHARS:
            cut = len(text)
        if cut:
            yield text[:cut]
        pending = text[cut:]
    try:
        pending += decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise InputError(f"{path} ends inside a UTF-8 character; "
                         "convert it to UTF-8 text or leave it out") from None
    if pending:
        yield pending


def _records(part: TextPart, text_field: str, meter: _Meter, problems: RecordProblems) -> Iterator[str]:
    """The text of each usable record of a JSON Lines or Parquet part; bad ones go to `problems`."""
    if part.format == PARQUET:
        yield from _parquet_records(part, text_field, meter, problems)
        return
    for number, line in _json_lines(part, meter):
        if not line.strip():
            continue  # blank lines separate nothing in JSON Lines; they are not records
        value, why = _json_field(line, text_field)
        if not why:
            text = record_text(value)
            if text is not None:
                if text:
                    yield text
                continue
            why = f"field {text_field!r} is {type(value).__name__}, not a string"
        problems.add_bad(lambda number=number: _line_where(part.path, number), why)


def record_text(value: Any) -> str | None:
    """A record field's text: a string as it is; a conversation's messages (`[{"role": ..., "content": "..."}]`)
    as their contents one after another, so a tokenizer can be trained on conversations too; else None."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                 for m in value):
        return "\n".join(m["content"] for m in value)
    return None


def iter_record_values(sources: TextFiles | Sequence[Path | TextPart], field_name: str, problems: RecordProblems,
                       on_bytes: Callable[[int], None] | None = None) -> Iterator[tuple[Where, Any]]:
    """(where, value) of `field_name` in each record of `sources`, for records that hold more than text.

    The same files, parts and held-out cuts as `iter_pieces`, but the value is handed over as JSON gave
    it (a Parquet cell as pyarrow's `to_pylist` does: a list of structs becomes a list of dicts, a null
    None), for the caller to judge: a conversation's list of messages, say. A record that is not JSON,
    not an object or lacks the field is counted in `problems` and skipped; the caller counts the good
    ones. `where` names the record ("file.jsonl:17", "file.parquet: row 3") when called; hand it to
    `RecordProblems.add_bad` as it is. Raises `InputError`, before reading anything, when a part is
    not JSON Lines or Parquet.
    """
    sources = _as_text_files(sources)
    for part in sources.parts:
        if part.format not in RECORD_FORMATS:
            raise InputError(f"{part.path} is not JSON Lines or Parquet; records with a {field_name!r} field are "
                             "read from .jsonl, .jsonl.gz or .parquet files")
    for part in sources.parts:
        meter = _Meter(part.size, on_bytes)
        yield from _record_values(part, field_name, meter, problems)
        meter.finish()


def _record_values(part: TextPart, field_name: str, meter: _Meter,
                   problems: RecordProblems) -> Iterator[tuple[Where, Any]]:
    path = part.path
    if part.format == PARQUET:
        parquet = _parquet_file(path)
        names = parquet.schema_arrow.names
        if field_name not in names:
            first, stop = _row_range(part, parquet)
            problems.add_bad(str(path), f"no column {field_name!r} (it has {', '.join(names[:8])})", count=stop - first)
            return
        for row, value in _parquet_rows(parquet, part, field_name, meter):
            yield (lambda row=row: f"{path}: row {row}"), value
        return
    for number, line in _json_lines(part, meter):
        if not line.strip():
            continue
        value, why = _json_field(line, field_name)
        if why:
            problems.add_bad(lambda number=number: _line_where(path, number), why)
        else:
            yield (lambda number=number: _line_where(path, number)), value


def _json_field(line: bytes, field_name: str) -> tuple[Any, str]:
    """(the value of `field_name` in one JSON Lines record, "") or (None, why the record has none)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None, "not JSON"
    if not isinstance(record, dict):
        return None, "not a JSON object"
    if field_name not in record:
        return None, f"no field {field_name!r}"
    return record[field_name], ""


def _line_where(path: Path, number: Any) -> str:
    return f"{path}:{number() if callable(number) else number}"


def _json_lines(part: TextPart, meter: _Meter) -> Iterator[tuple[Any, bytes]]:
    """(line number, line) for each line of a JSON Lines part; the number is exact, computed lazily for
    parts that start inside a file (only a bad record needs it)."""
    if part.format == JSONL_GZ:
        first = part.records[0] if part.records is not None else 0
        for index, line in enumerate(_gzip_lines(part, meter)):
            yield first + index + 1, line
        return
    with part.path.open("rb") as handle:
        handle.seek(part.start)
        position, index = part.start, 0
        while position < part.end and (line := handle.readline()):
            line_start = position
            position += len(line)
            meter.add(len(line))
            if index == 0 and line_start == 0:
                line = line.removeprefix(b"\xef\xbb\xbf")  # a byte order mark is not part of the JSON
            yield (lambda at=line_start: _line_number(part.path, at)), line
            index += 1


def _line_number(path: Path, offset: int) -> int:
    """The 1-based number of the line that starts at byte `offset` of `path`."""
    lines = 1
    with path.open("rb") as handle:
        left = offset
        while left and (block := handle.read(min(1 << 20, left))):
            lines += block.count(b"\n")
            left -= len(block)
    return lines


def _parquet_records(part: TextPart, text_field: str, meter: _Meter, problems: RecordProblems) -> Iterator[str]:
    import pyarrow as pa

    parquet = _parquet_file(part.path)
    schema = parquet.schema_arrow
    column = schema.field(text_field) if text_field in schema.names else None
    if column is None or not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        why = (f"no column {text_field!r} (it has {', '.join(schema.names[:8])})" if column is None
               else f"column {text_field!r} holds {column.type}, not text")
        first, stop = _row_range(part, parquet)
        problems.add_bad(str(part.path), why, count=stop - first)
        return
    for row, value in _parquet_rows(parquet, part, text_field, meter):
        if value is None:
            problems.add_bad(f"{part.path}: row {row}", "null text")
        elif value:
            yield value


def _row_range(part: TextPart, parquet: Any) -> tuple[int, int]:
    return part.records if part.records is not None else (0, parquet.metadata.num_rows)


def _parquet_rows(parquet: Any, part: TextPart, column: str, meter: _Meter) -> Iterator[tuple[int, Any]]:
    """(1-based row number, value) of `column` in each row of a Parquet part, read a batch at a time."""
    first, stop = _row_range(part, parquet)
    row = 0
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[column]):
        values = batch.column(0)
        if row + len(values) > first:
            start = max(0, first - row)
            for offset, value in enumerate(values.to_pylist()[start:stop - row]):
                yield row + start + offset + 1, value
        row += len(values)
        meter.fraction((row - first) / max(1, stop - first))
        if row >= stop:
            break


def _not_utf8(path: Path, offset: int, err: UnicodeDecodeError) -> InputError:
    # The decoder may hold back a few bytes of an earlier piece, so the offset is exact to within those.
    bad = err.object[err.start]
    return InputError(f"{path} is not UTF-8 text (byte 0x{bad:02x} near offset {offset + err.start}); "
                      "convert it to UTF-8 text or leave it out")


def read_text_option(path: Path, flag: str) -> str:
    """The whole of a small UTF-8 file given with `flag` (a prompt, a text to inspect)."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
        raise InputError(f"cannot read {flag} {path} ({reason}); give a UTF-8 text file") from None
