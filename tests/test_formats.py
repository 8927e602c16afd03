"""Corpus formats through the one reader: JSON Lines, Parquet and gzip read as the equivalent text files."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import SAMPLE, assert_one_line_error, run_lm

from lm.data import tokenize_corpus
from lm.errors import InputError
from lm.textfiles import (
    CHUNK_BYTES,
    RecordProblems,
    TextFiles,
    find_text_files,
    hold_out_tail,
    iter_pieces,
    iter_text_chunks,
    text_bytes,
)
from lm.tokenizer import Tokenizer

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def documents() -> list[str]:
    """Three documents: a long one (several read chunks, Unicode cut across them), a short one, one line."""
    sample = SAMPLE.read_text(encoding="utf-8") * 3
    assert len(sample.encode()) > 2 * CHUNK_BYTES
    return [sample, "Second document,\n  indented,\r\nwith 日本語 and 🕯️.\n\n", "no newline at the end"]


def write_formats(folder: Path, docs: list[str], field: str = "text") -> dict[str, Path]:
    """The same documents as text files, .txt.gz files, JSON Lines (plain, .json, .gz) and Parquet."""
    made = {name: folder / name for name in ("txt", "txt.gz")}
    for name in made.values():
        name.mkdir()
    for index, doc in enumerate(docs):
        (made["txt"] / f"{index:03d}.txt").write_text(doc, encoding="utf-8", newline="")
        (made["txt.gz"] / f"{index:03d}.txt.gz").write_bytes(gzip.compress(doc.encode()))
    lines = "".join(json.dumps({"id": i, field: doc}, ensure_ascii=i % 2 == 0) + "\n" for i, doc in enumerate(docs))
    made["jsonl"] = folder / "docs.jsonl"
    made["jsonl"].write_text(lines, encoding="utf-8")
    made["json"] = folder / "docs.json"
    made["json"].write_text(lines, encoding="utf-8")
    made["jsonl.gz"] = folder / "docs.jsonl.gz"
    made["jsonl.gz"].write_bytes(gzip.compress(lines.encode()))
    made["parquet"] = folder / "docs.parquet"
    pq.write_table(pa.table({"id": list(range(len(docs))), field: docs}), made["parquet"], row_group_size=2)
    return made


@pytest.mark.parametrize("kind", ["txt.gz", "jsonl", "json", "jsonl.gz", "parquet"])
def test_each_format_gives_the_token_stream_of_the_text_files(kind: str, tmp_path: Path,
                                                              sample_tokenizer: Tokenizer) -> None:
    made = write_formats(tmp_path, documents())
    cache = tmp_path / "cache"
    expected = tokenize_corpus(find_text_files([made["txt"]]), sample_tokenizer, cache_root=cache)
    got = tokenize_corpus(find_text_files([made[kind]]), sample_tokenizer, cache_root=cache, threads=2)
    assert not got.reused and got.path != expected.path
    assert torch.equal(got.tokens, expected.tokens)
    assert got.tokens.long().tolist().count(sample_tokenizer.eot_id) == 3 and got.bad_records == 0
    text = "".join(iter_text_chunks(find_text_files([made[kind]])))
    assert text == "".join(documents())


@pytest.mark.parametrize("kind", ["txt", "txt.gz", "jsonl", "jsonl.gz", "parquet"])
def test_text_bytes_counts_compressed_files_as_their_text(kind: str, tmp_path: Path) -> None:
    made = write_formats(tmp_path, documents())
    plain = {"txt": made["txt"], "txt.gz": made["txt"], "parquet": made["txt"], "jsonl": made["jsonl"],
             "jsonl.gz": made["jsonl"]}[kind]
    expected = find_text_files([plain]).total_bytes
    sources = find_text_files([made[kind]])
    if kind == "parquet":  # the column's pages hold a length before each value, and page headers
        assert expected <= text_bytes(sources) < 1.1 * expected
    else:
        assert text_bytes(sources) == expected
    if kind in ("txt.gz", "jsonl.gz", "parquet"):
        assert sources.total_bytes < 0.8 * expected  # on disk: compressed (the long document repeats itself)


def test_the_text_field_is_chosen_and_part_of_the_cache_key(tmp_path: Path, sample_tokenizer: Tokenizer) -> None:
    made = write_formats(tmp_path, documents(), field="body")
    with pytest.raises(InputError, match=r"none of the 3 records is usable.*no field 'text'.*--text-field"):
        tokenize_corpus(find_text_files([made["jsonl"]]), sample_tokenizer, cache_root=tmp_path / "c")
    body = tokenize_corpus(find_text_files([made["jsonl"]], text_field="body"), sample_tokenizer,
                           cache_root=tmp_path / "c")
    assert sample_tokenizer.decode(body.tokens.long().tolist()).startswith(documents()[0][:100])
    with pytest.raises(InputError, match="no column 'text' \\(it has id, body\\)"):
        list(iter_pieces(find_text_files([made["parquet"]])))


def test_bad_records_are_counted_skipped_and_the_first_located(tmp_path: Path, sample_tokenizer: Tokenizer) -> None:
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"text": "good one\\n"}\n{not json\n\n{"other": 1}\n{"text": 5}\n[1, 2]\n{"text": "two"}\n')
    problems = RecordProblems()
    pieces = list(iter_pieces(find_text_files([path]), problems=problems))
    assert [text for _, text, _ in pieces if text] == ["good one\n", "two"]
    assert (problems.bad, problems.good) == (4, 2)
    assert problems.first == f"{path}:2: not JSON"
    corpus = tokenize_corpus(find_text_files([path]), sample_tokenizer, cache_root=tmp_path / "c")
    assert corpus.bad_records == 4 and corpus.first_bad_record == f"{path}:2: not JSON"
    again = tokenize_corpus(find_text_files([path]), sample_tokenizer, cache_root=tmp_path / "c")
    assert again.reused and again.bad_records == 4  # the report survives the cache
    # A held-out tail that starts inside the file still names the line in the whole file.
    tail = tmp_path / "tail.jsonl"
    tail.write_text('{"text": "a"}\n' * 50 + '{"text": null}\n' + '{"text": "b"}\n' * 10)
    _, val = hold_out_tail(find_text_files([tail]), 0.3)
    problems = RecordProblems()
    list(iter_pieces(val, problems=problems))
    assert problems.first == f"{tail}:51: field 'text' is NoneType, not a string"


def test_all_bad_records_stop_the_run_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"content": "x"}\n{"content": "y"}\n')
    result = run_lm("train-tokenizer", path, "--vocab-size", "300", "--out", tmp_path / "tok.json")
    assert_one_line_error(result, "none of the 2 records is usable", f"{path}:1: no field 'text'")
    ok = run_lm("train-tokenizer", path, "--vocab-size", "260", "--out", tmp_path / "tok.json",
                "--text-field", "content")
    assert ok.returncode == 0, ok.stderr


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "parquet", "txt.gz"])
def test_held_out_tail_takes_whole_records(kind: str, tmp_path: Path) -> None:
    docs = [f"record {i}: " + "word " * (i % 7) + "\n" for i in range(40)]
    made = write_formats(tmp_path, docs)
    sources = find_text_files([made[kind]])
    train, val = hold_out_tail(sources, 0.25)

    def documents_of(files: TextFiles) -> list[str]:
        return [text for _, text, _ in iter_pieces(files) if text]

    if kind == "txt.gz":  # one document per file: the last files go whole, the one cut is cut at a line
        assert "".join(documents_of(train) + documents_of(val)) == "".join(docs)
    else:
        assert documents_of(train) + documents_of(val) == docs
        assert 0.15 < len(documents_of(val)) / len(docs) < 0.35


def test_files_that_are_not_what_their_names_say(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "array.json").write_text('[{"text": "a"}]\n')
    (tmp_path / "fake.gz").write_text("plain text\n")
    (tmp_path / "fake.parquet").write_text("plain text\n")
    (tmp_path / "corpus.tar.gz").write_bytes(gzip.compress(b"x"))
    for name, needle in (("array.json", "is one JSON array"), ("fake.gz", "is not gzip data"),
                         ("fake.parquet", "is not a Parquet file"), ("corpus.tar.gz", "is an archive")):
        with pytest.raises(InputError, match=needle):
            find_text_files([tmp_path / name])
    (tmp_path / "sub").mkdir()
    good = write_formats(tmp_path / "sub", ["x\n"])
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if pyarrow were not installed
    with pytest.raises(InputError, match="pip install 'lm-from-text\\[parquet\\]'"):
        find_text_files([good["parquet"]])


def test_wide_vocabularies_are_stored_as_uint32_with_the_same_ids(tmp_path: Path, sample_tokenizer) -> None:
    wide = Tokenizer.from_str(sample_tokenizer.to_str())
    wide.hf.add_special_tokens([f"<|extra{i}|>" for i in range(70_000)])
    wide = Tokenizer(wide.hf)
    assert wide.vocab_size > 1 << 16
    narrow = tokenize_corpus(find_text_files([SAMPLE]), sample_tokenizer, cache_root=tmp_path / "c")
    stored = tokenize_corpus(find_text_files([SAMPLE]), wide, cache_root=tmp_path / "c")
    assert stored.tokens.dtype == torch.uint32 and narrow.tokens.dtype == torch.uint16
    assert stored.tokens.long().tolist() == narrow.tokens.long().tolist()


def test_the_fast_encoder_gives_the_tokenizers_ids_in_any_number_of_threads(tmp_path: Path,
                                                                            sample_tokenizer) -> None:
    assert sample_tokenizer.uses_tiktoken
    texts = [chunk for chunk in iter_text_chunks([SAMPLE])]
    fast = sample_tokenizer.batch_encoder()(texts)
    assert [a.tolist() for a in fast] == sample_tokenizer.encode_batch(texts)
    one = tokenize_corpus(find_text_files([SAMPLE]), sample_tokenizer, cache_root=tmp_path / "a", threads=1)
    three = tokenize_corpus(find_text_files([SAMPLE]), sample_tokenizer, cache_root=tmp_path / "b", threads=3)
    assert torch.equal(one.tokens, three.tokens)
