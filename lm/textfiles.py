"""Finding the user's text files and streaming them as lines of UTF-8 text.

A PATH given on the command line is a file, a folder (every text file in it, recursively, hidden
ones left out) or a glob pattern. Files named directly must be UTF-8 text; files found while walking
a folder are kept only if they look like text, so a stray image in `data/` is skipped and reported.
Files are read in chunks of whole lines, never whole, so memory does not grow with the corpus.
"""

from __future__ import annotations

import codecs
import glob
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lm.errors import InputError

SNIFF_BYTES = 8192
# Small chunks keep memory flat: tokenizers' trainer buffers 256 items from a Python iterator at a time.
CHUNK_BYTES = 1 << 12
# Longest line kept whole: a file with no newlines is still read in bounded pieces.
MAX_LINE_CHARS = 1 << 20
GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class TextPart:
    """Bytes `start` to `end` of a file: a whole file, or the piece on one side of a held-out cut."""

    path: Path
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass
class TextFiles:
    """The files a set of PATH arguments resolved to, in a stable order; each part is one document."""

    parts: list[TextPart]
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def files(self) -> list[Path]:
        return [part.path for part in self.parts]

    @property
    def sizes(self) -> list[int]:
        return [part.size for part in self.parts]

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes)


def find_text_files(specs: Sequence[str | Path], exclude: Sequence[Path] = ()) -> TextFiles:
    """Resolve files, folders and globs to a list of readable, non-empty UTF-8 text files.

    `exclude` names files to leave out, such as the command's own output from an earlier run sitting
    in the folder being read. Raises `InputError` for a path that does not exist, a glob that matches
    nothing, a named file that is empty or not UTF-8, or when nothing readable is left at all.
    """
    if not specs:
        raise InputError("no input given; pass one or more text files, folders or glob patterns")
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
                         f"({_describe_skips(skipped)}); point at UTF-8 text files")
    return TextFiles([TextPart(p, 0, p.stat().st_size) for p in chosen], skipped=skipped)


def hold_out_tail(sources: TextFiles, fraction: float) -> tuple[TextFiles, TextFiles]:
    """Split the text in two at a line end: (about the first 1 - `fraction` of the bytes, the rest).

    The cut is the first line end at or after that many bytes (the last one before it when the text
    ends first), so no line and no UTF-8 character is cut in half; a file cut in two gives one
    document on each side. Raises `InputError` when one side would be empty.
    """
    target = round(sources.total_bytes * (1 - fraction))
    seen = 0
    for index, part in enumerate(sources.parts):
        if seen + part.size > target:
            cut = _line_end_after(part, part.start + target - seen)
            if cut == part.end and index == len(sources.parts) - 1:
                cut = _line_end_before(part, part.end - 1)
            before = [*sources.parts[:index], *([TextPart(part.path, part.start, cut)] if cut > part.start else [])]
            after = [*([TextPart(part.path, cut, part.end)] if cut < part.end else []), *sources.parts[index + 1:]]
            if before and after:
                return TextFiles(before, sources.skipped), TextFiles(after)
            break
        seen += part.size
    raise InputError(f"{sources.total_bytes:,} bytes of text cannot be split into training and {fraction:.0%} "
                     "validation at a line end; give more text, or pass --val FILES")


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
    """Why `path` is not usable text, judged from its first bytes, or None if it looks fine."""
    try:
        with path.open("rb") as handle:
            head = handle.read(SNIFF_BYTES)
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
    return None


def _fix_for(problem: str) -> str:
    if problem.startswith("is empty"):
        return "give a file with text in it"
    if problem.startswith("cannot be read"):
        return "check its permissions"
    return "convert it to UTF-8 text or leave it out"


def _describe_skips(skipped: list[tuple[Path, str]]) -> str:
    if not skipped:
        return "nothing to read"
    return f"skipped {len(skipped)} file(s), e.g. {skipped[0][0]} {skipped[0][1]}"


def iter_text_chunks(files: Sequence[Path | TextPart],
                     on_bytes: Callable[[int], None] | None = None) -> Iterator[str]:
    """Yield the text of `files` (whole files, or parts of them) in pieces of whole lines, about
    `CHUNK_BYTES` each.

    Joining the pieces of a file gives its text back exactly (line endings kept). A line longer than
    `MAX_LINE_CHARS` is cut, so memory stays bounded whatever the input. `on_bytes(n)` is called with
    the bytes consumed after each read. A UTF-8 byte order mark at a file's start is dropped (it marks
    the encoding, it is not text). Raises `InputError` naming the file and offset of invalid UTF-8.
    """
    for item in files:
        part = item if isinstance(item, TextPart) else TextPart(item, 0, item.stat().st_size)
        path = part.path
        decoder = codecs.getincrementaldecoder("utf-8-sig" if part.start == 0 else "utf-8")()
        offset = part.start
        pending = ""
        with path.open("rb") as handle:
            handle.seek(part.start)
            while raw := handle.read(min(CHUNK_BYTES, part.end - offset)):
                try:
                    text = pending + decoder.decode(raw)
                except UnicodeDecodeError as err:
                    raise _not_utf8(path, offset, err) from None
                offset += len(raw)
                if on_bytes is not None:
                    on_bytes(len(raw))
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
