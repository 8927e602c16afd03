"""Shared fixtures: a small tokenizer trained once, and a runner for the real `lm` executable.

Tests marked `cuda` (tests/test_cuda.py) need a CUDA GPU and are skipped without one; `make gpu-check`
runs them where there is one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# Tests fork `lm` subprocesses; tokenizers' thread pool must not be live across a fork.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Token caches and downloads go to a folder of this test session, never to the user's ~/.cache.
os.environ["LM_CACHE_DIR"] = tempfile.mkdtemp(prefix="lm-test-cache-")
# One CPU matrix kernel for the whole suite, whichever this machine would measure as faster
# (tests/test_linear.py checks the measuring itself).
os.environ.setdefault("LM_CPU_MATMUL", "onednn")

try:  # the GPU machines that run `make gpu-check` have pytest but not hypothesis
    from hypothesis import settings
except ImportError:  # pragma: no cover
    settings = None
else:
    settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True)
    settings.register_profile("dev", deadline=None)
    settings.load_profile("ci" if os.environ.get("CI") else "dev")

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample.txt"
LM = Path(sys.executable).parent / "lm"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one; `make gpu-check` runs them)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    marked = [item for item in items if item.get_closest_marker("cuda")]
    if not marked:
        return
    import torch  # only when a CUDA test was collected: `lm --help` style tests stay light

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in marked:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def play_text(tmp_path_factory) -> Path:
    """The play in data/sample.txt without its multilingual notes, three times: ~11 kB whose last tenth
    (the validation split) reads like the rest, so validation loss can be expected to fall."""
    play = SAMPLE.read_text(encoding="utf-8").split("THE END")[0]
    path = tmp_path_factory.mktemp("play") / "play.txt"
    path.write_text(play * 3, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def sample_tokenizer():
    """A 512-token vocabulary learned from data/sample.txt (a few milliseconds)."""
    from lm.textfiles import find_text_files
    from lm.tokenizer import TokenizerConfig, train_tokenizer

    tokenizer, _ = train_tokenizer(find_text_files([SAMPLE]), TokenizerConfig(vocab_size=512))
    return tokenizer


def run_lm(*args: str | Path, cwd: Path | None = None, stdin: str | None = None,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed `lm` executable, as a user would, and capture what it prints."""
    assert LM.exists(), f"the lm entry point is not installed beside {sys.executable}"
    return subprocess.run(
        [str(LM), *map(str, args)], cwd=cwd, input=stdin, capture_output=True, text=True,
        env={**os.environ, "COLUMNS": "120", **(env or {})}, timeout=120,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    """A user error: non-zero exit, one line on stderr that says what is wrong, no traceback.

    Progress notices printed before the problem showed up may precede it; the error is the last line.
    """
    assert result.returncode in (1, 2), (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


def random_weights(model, seed: int = 0, scale: float = 0.2) -> None:
    """Every parameter, norms and biases included, drawn from N(0, scale²): varied, confident outputs."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * scale)


def write_run(path: Path, tokenizer, config, seed: int = 0) -> Path:
    """A run directory holding a randomly weighted model of `config`, as `lm train` would lay it out."""
    from safetensors.torch import save_file

    from lm import rundir
    from lm.checkpoint import model_state_dict
    from lm.config import TrainConfig
    from lm.model import GPT

    model = GPT(config)
    random_weights(model, seed)
    path.mkdir(parents=True)
    save_file(model_state_dict(model), str(path / rundir.WEIGHTS))
    tokenizer.save(path / rundir.TOKENIZER)
    rundir.write_config(path, config, TrainConfig(), {"parameters": model.num_parameters()})
    return path
