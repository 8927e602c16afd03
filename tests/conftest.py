"""Shared fixtures: a small tokenizer trained once, and runners for `lm`: in this process (`run_lm`, what most
tests use: no Python and torch to start for each call) and as the installed executable (`run_lm_process`, for
what only a process shows: signals, torchrun, the entry point itself).

Tests marked `cuda` (tests/test_cuda.py) need a CUDA GPU and are skipped without one; `make gpu-check`
runs them where there is one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

import pytest

# Tests fork `lm` subprocesses; tokenizers' thread pool must not be live across a fork.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Token caches and downloads go to a folder of this test session, never to the user's ~/.cache.
os.environ["LM_CACHE_DIR"] = tempfile.mkdtemp(prefix="lm-test-cache-")
# torch.compile's on-disk cache leaves out of its keys the vector width it generated code for: an entry
# written with this CPU's own and read under ATEN_CPU_CAPABILITY=avx2 (how the suite emulates an AVX2-only
# CPU) gave NaN logits, and the other way round corrupted the heap. One cache folder per setting, then.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"lm-test-inductor-{os.getuid() if hasattr(os, 'getuid') else 0}-"
                           f"{os.environ.get('ATEN_CPU_CAPABILITY', '').strip().lower() or 'native'}"))
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


def run_lm_process(*args: str | Path, cwd: Path | None = None, stdin: str | None = None,
                   env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed `lm` executable, as a user would, and capture what it prints."""
    assert LM.exists(), f"the lm entry point is not installed beside {sys.executable}"
    return subprocess.run(
        [str(LM), *map(str, args)], cwd=cwd, input=stdin, capture_output=True, text=True,
        env={**os.environ, "COLUMNS": "120", **(env or {})}, timeout=120,
    )


# What a fresh interpreter (no -W, no PYTHONWARNINGS, not in development mode) starts with.
STARTUP_WARNING_FILTERS = [("default", DeprecationWarning, "__main__"), ("ignore", DeprecationWarning, ""),
                           ("ignore", PendingDeprecationWarning, ""), ("ignore", ImportWarning, ""),
                           ("ignore", ResourceWarning, "")]


def run_lm(*args: str | Path, cwd: Path | None = None, stdin: str | None = None,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `lm` in this process and capture what it prints: what `run_lm_process` gives, without starting
    Python and importing torch for each call.

    The very entry point the executable runs (lm.cli.main.main: its one-line errors and exit codes), with
    standard input, output and error of its own, `sys.argv`, the working folder and the environment as the
    process would have them, warnings shown on standard error as a fresh interpreter shows them, and an
    uncaught exception printed as a traceback with exit code 1. Like a new process it knows no CPU choice
    (lm/cpu_choices.py) but what the cache folder holds. What one call changes in this process is put back
    afterwards: the environment, the cached rich consoles (they keep the width COLUMNS gave them), torch's
    thread count, random state, grad mode, default dtype and matmul precision.
    """
    from typer._click import formatting
    from typer.testing import CliRunner

    from lm.cli.main import main

    argv = [str(arg) for arg in args]
    saved_environ, saved_argv, saved_cwd = dict(os.environ), sys.argv, os.getcwd()
    restore_torch = _save_torch_state()
    _forget_consoles()
    _forget_cpu_choices()
    code = 0
    try:
        with CliRunner().isolation(input=stdin, env={"COLUMNS": "120", **(env or {})}) as (out, err, _), \
                warnings.catch_warnings():
            formatting.FORCED_WIDTH = None  # the runner's 80 columns for click's help; the process has COLUMNS
            warnings.resetwarnings()
            for action, category, module in reversed(STARTUP_WARNING_FILTERS):
                warnings.filterwarnings(action, category=category, module=module)
            warnings.showwarning = _show_warning
            sys.argv = ["lm", *argv]
            if cwd is not None:
                os.chdir(cwd)
            try:
                main(argv)
            except SystemExit as exit_:
                code = _exit_status(exit_)
            except Exception:  # what the interpreter does with an exception nothing caught
                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
            stdout, stderr = out.getvalue().decode(), err.getvalue().decode(errors="backslashreplace")
    finally:
        os.chdir(saved_cwd)
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_environ)
        restore_torch()
        _forget_consoles()
        _forget_cpu_choices()
    # As subprocess.run(text=True) reads them: universal newlines.
    stdout, stderr = (text.replace("\r\n", "\n").replace("\r", "\n") for text in (stdout, stderr))
    return subprocess.CompletedProcess(["lm", *argv], code, stdout, stderr)


def _exit_status(exit_: SystemExit) -> int:
    if exit_.code is None:
        return 0
    if isinstance(exit_.code, int):
        return exit_.code
    print(exit_.code, file=sys.stderr)  # sys.exit("message"): the interpreter prints it and exits with 1
    return 1


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def _forget_consoles() -> None:
    """The next call builds its rich consoles afresh, as a new process would (for the width COLUMNS says)."""
    render = sys.modules.get("lm.cli.render")
    if render is not None:
        render.stdout.cache_clear()
        render.stderr.cache_clear()


def _forget_cpu_choices() -> None:
    """What this process decided (matmul kernel, Newton-Schulz precision, decoding build) is dropped: the next
    lookup reads the cache folder, as a new process does."""
    for module, forget in (("lm.linear", "forget_decisions"), ("lm.optim", "forget_newton_schulz_choices"),
                           ("lm.cpu_kernels", "forget_decode_marches")):
        if module in sys.modules:
            getattr(sys.modules[module], forget)()


def _save_torch_state():
    torch = sys.modules.get("torch")
    if torch is None:  # nothing to keep: the call may import it, as a process would
        return lambda: None
    threads, rng, grad, dtype = (torch.get_num_threads(), torch.random.get_rng_state(), torch.is_grad_enabled(),
                                 torch.get_default_dtype())
    precision = torch.get_float32_matmul_precision()

    def restore() -> None:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        torch.random.set_rng_state(rng)
        torch.set_grad_enabled(grad)
        if torch.get_default_dtype() != dtype:
            torch.set_default_dtype(dtype)
        if torch.get_float32_matmul_precision() != precision:
            torch.set_float32_matmul_precision(precision)

    return restore


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


def write_run(path: Path, tokenizer, config, seed: int = 0, scale: float = 0.2) -> Path:
    """A run directory holding a randomly weighted model of `config` (`random_weights` with `scale`), as
    `lm train` would lay it out."""
    from safetensors.torch import save_file

    from lm import rundir
    from lm.checkpoint import model_state_dict
    from lm.config import TrainConfig
    from lm.model import GPT

    model = GPT(config)
    random_weights(model, seed, scale)
    path.mkdir(parents=True)
    save_file(model_state_dict(model), str(path / rundir.WEIGHTS))
    tokenizer.save(path / rundir.TOKENIZER)
    rundir.write_config(path, config, TrainConfig(), {"parameters": model.num_parameters()})
    return path


def record_draws(monkeypatch: pytest.MonkeyPatch) -> list:
    """The state of the generator before each token lm.generate samples, appended as it samples: what
    `assert_decodings_agree` replays to tell a near tie from a wrong token in sampled decoding."""
    import lm.generate

    states: list = []
    sample_next = lm.generate.sample_next

    def recording(logits, config, generator=None, seen=None):
        states.append(None if generator is None else generator.get_state())
        return sample_next(logits, config, generator, seen)

    monkeypatch.setattr(lm.generate, "sample_next", recording)
    return states


def assert_decodings_agree(reference, other, *, atol: float, rtol: float = 0.0, sampling=None,
                           draws: list | None = None, compare_logits: bool = True) -> int:
    """Two decodings of one prompt by different float code paths (cached and uncached, compiled and eager,
    lm and transformers) agree; the number of steps whose tokens agreed is returned.

    `reference` and `other` hold one step per new token, each with `ids` (samples,) and `logits`
    (samples, vocabulary), as lm.generate.Step does. The two paths round differently, so nothing is
    compared bit for bit: while both have taken the same tokens, each row of logits must agree to
    atol + rtol x the reference row's largest magnitude (if `compare_logits`), and the tokens must agree,
    except at a near tie, where logits within that tolerance of the reference's could have taken the
    other path's token (greedy: the reference's top two within twice the tolerance; sampled: `sampling`,
    replaying the reference's own draw from `draws`, what `record_draws` kept, no repetition penalty).
    Past a step where they part the two paths read different texts, and nothing more is compared.
    """
    import torch

    from lm.sampling import sample_next

    for step, (a, b) in enumerate(zip(reference, other, strict=True)):
        expected, got = a.logits.float().cpu(), b.logits.float().cpu()
        tolerance = atol + rtol * expected.abs().amax(dim=-1, keepdim=True)
        if compare_logits:
            excess = ((got - expected).abs() - tolerance).max().item()
            assert excess <= 0, f"logits differ at step {step} by {excess:.3g} more than the tolerance"
        if torch.equal(a.ids.cpu(), b.ids.cpu()):
            continue
        theirs = b.ids.cpu().view(-1, 1)
        worst = expected - tolerance  # the other path's token as favoured as the tolerance allows
        worst.scatter_(1, theirs, expected.gather(1, theirs) + tolerance)
        if sampling is None or sampling.greedy:
            could = worst.gather(1, theirs).squeeze(1) >= worst.amax(dim=-1)
        else:
            generator = torch.Generator().set_state(draws[step])
            assert torch.equal(sample_next(expected, sampling, generator), a.ids.cpu()), "not the draw recorded"
            could = sample_next(worst, sampling, generator.set_state(draws[step])) == theirs.squeeze(1)
        parted = a.ids.cpu() != b.ids.cpu()
        assert could[parted].all(), f"tokens differ at step {step} without a near tie"
        return step
    return len(reference)


@pytest.fixture
def randn_shapes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """The size of every tensor `torch.randn` makes during the test, in order (what a probe measured on)."""
    import torch

    shapes: list[tuple[int, ...]] = []
    real_randn = torch.randn

    def recording_randn(*size, **kwargs):
        shapes.append(tuple(size))
        return real_randn(*size, **kwargs)

    monkeypatch.setattr(torch, "randn", recording_randn)
    return shapes
