"""The CUDA path: precision, attention kernels, decoding with CUDA graphs, checkpoints across devices, NCCL.

Every test here is marked `cuda` and skipped without a CUDA GPU; `make gpu-check` runs them (with a time
limit) and puts the outcome in its table. Tolerances are stated where the numbers are compared:
one rounding to bfloat16 (8 significant bits) errs by up to 2^-8 = 0.4% (a "bf16 step" below), so bf16
results are compared to a few of those steps, measured against the largest value compared (a wrong mask
or a stale cache entry moves results by tens of percent); float32 comparisons switch TF32 off
(`torch.set_float32_matmul_precision("highest")`) so that they can be tight.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SAMPLE, assert_decodings_agree
from test_train import make_setup as train_setup

from lm import checkpoint, rundir
from lm.config import ModelConfig
from lm.generate import CompiledDecoder, GenerationStats, Step, generate_tokens
from lm.model import GPT, causal_attention, explicit_attention
from lm.sampling import SamplingConfig
from lm.train import Trainer, TrainingSetup

pytestmark = pytest.mark.cuda

DEVICE = "cuda"
GREEDY = SamplingConfig(temperature=0.0)
BF16_STEP = 2.0**-8  # the largest relative error of one rounding to bfloat16
SUBPROCESS_TIMEOUT_S = 240  # each `lm train` below takes seconds; a hang fails the test instead


@pytest.fixture(autouse=True)
def float32_precision():
    """Tests may switch TF32 off, and the Trainer switches it on: each test leaves the setting as it was."""
    before = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(before)


def make_setup(run_dir: Path, tokenizer, text: Path, resume: bool = False, **train_changes) -> TrainingSetup:
    return train_setup(run_dir, tokenizer, resume=resume, text=text,
                       **{"max_steps": 60, "eval_every": 30, "device": DEVICE, **train_changes})


def losses(run_dir: Path) -> list[float]:
    return [record["loss"] for record in rundir.read_metrics(run_dir)]


def random_model(dtype: torch.dtype = torch.float32, context_length: int = 64) -> GPT:
    """A small GPT with weights larger than a fresh init: peaked attention and clear greedy choices,
    so a wrong mask or a stale cache entry changes the logits by far more than rounding does."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=97, context_length=context_length, n_layer=2, n_head=4, d_model=64)
    model = GPT(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(std=0.3)
    return model.to(DEVICE, dtype)


def prompt(length: int = 12) -> list[int]:
    return torch.randint(0, 97, (length,), generator=torch.Generator().manual_seed(1)).tolist()


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest difference, relative to the largest magnitude expected."""
    return ((got.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


# --- training in reduced precision ---------------------------------------------------------------------


def test_bf16_autocast_training_learns(sample_tokenizer, play_text: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    trainer = Trainer(make_setup(run, sample_tokenizer, play_text, dtype="bfloat16"))
    assert trainer.device.type == DEVICE and trainer.dtype == torch.bfloat16 and trainer.scaler is None
    untrained = trainer.evaluate().val_loss
    outcome = trainer.run()
    assert outcome.status == "finished"
    recorded = losses(run)
    assert all(math.isfinite(loss) for loss in recorded)
    assert sum(recorded[-10:]) < sum(recorded[:10]) - 5  # a clear drop, as the float32 CPU test asks
    assert outcome.evaluation.val_loss < untrained - 0.5


def test_fp16_with_the_gradient_scaler_learns_and_skips_overflow_steps(sample_tokenizer, play_text: Path,
                                                                       tmp_path: Path) -> None:
    """An overflowing step must leave weights and AdamW's state (moments and step count) untouched and
    halve the scale; training then goes on and learns. The fused AdamW skips the update itself, told by
    the scaler (GradScaler.step passes `found_inf` to optimizers that support it)."""
    run = tmp_path / "run"
    trainer = Trainer(make_setup(run, sample_tokenizer, play_text, dtype="float16"))
    assert trainer.dtype == torch.float16 and trainer.scaler is not None
    untrained = trainer.evaluate().val_loss
    for _ in range(5):  # a few ordinary steps, so the optimizer has state and the scale has settled
        trainer._train_step(1e-3)
        trainer.step += 1
    weights = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in trainer.optimizers[0].state.items()}
    scale = trainer.scaler.get_scale()

    overflow = trainer.model.blocks[0].mlp.fc.weight.register_hook(lambda grad: torch.full_like(grad, math.inf))
    trainer._train_step(1e-3)
    overflow.remove()
    trainer.step += 1

    assert trainer.scaler.get_scale() == scale * 0.5
    for name, param in trainer.model.named_parameters():
        assert torch.equal(param.detach(), weights[name]), f"{name} changed on an overflowing step"
    for param, param_state in trainer.optimizers[0].state.items():
        for key, value in param_state.items():
            assert torch.equal(value, state[id(param)][key]), f"optimizer {key} changed on an overflowing step"

    outcome = trainer.run()
    assert outcome.status == "finished"
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert all(math.isfinite(loss) for loss in losses(run))
    assert outcome.evaluation.val_loss < untrained - 0.5


# --- attention kernels ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("queries", "keys"), [(64, 64), (1, 64), (16, 64)])  # training, decode, chunked prefill
def test_fused_and_explicit_attention_agree_in_bf16(queries: int, keys: int) -> None:
    """The fused kernel (flash / memory-efficient on CUDA) against the textbook formula in float32, rounded
    once to bf16: outputs within 4 bf16 steps of the largest output (2 on average), gradients within 8.
    (Measured with PyTorch's CPU kernels: about 1 step for outputs, 2 for gradients.)"""
    generator = torch.Generator(device=DEVICE).manual_seed(0)

    def tensor(time: int) -> torch.Tensor:
        return torch.randn(2, 4, time, 64, device=DEVICE, generator=generator).bfloat16().requires_grad_()

    q, k, v = tensor(queries), tensor(keys), tensor(keys)
    upstream = torch.randn(2, 4, queries, 64, device=DEVICE, generator=generator).bfloat16()
    fused = causal_attention(q, k, v)
    fused_grads = torch.autograd.grad(fused, (q, k, v), upstream)
    explicit, weights = explicit_attention(q, k, v)
    explicit_grads = torch.autograd.grad(explicit, (q, k, v), upstream)
    assert fused.dtype == explicit.dtype == torch.bfloat16
    assert torch.allclose(weights.sum(-1), torch.ones(()), atol=1e-5)
    assert relative_error(fused, explicit) <= 4 * BF16_STEP
    assert (fused.float() - explicit.float()).abs().mean() <= 2 * BF16_STEP * explicit.float().abs().mean()
    for name, got, expected in zip("qkv", fused_grads, explicit_grads, strict=True):
        assert relative_error(got, expected) <= 8 * BF16_STEP, f"gradient of {name}"


def test_the_model_gives_the_same_logits_through_both_attention_paths_in_bf16() -> None:
    model = random_model(torch.bfloat16)
    ids = torch.tensor([prompt(48)], device=DEVICE)
    with torch.no_grad():
        fused = model(ids)[0]
        explicit = model.trace(ids, attention_layers=frozenset(range(model.config.n_layer))).logits
    assert relative_error(fused, explicit) <= 16 * BF16_STEP  # two layers of bf16 weights: 2 steps on a CPU


# --- decoding ------------------------------------------------------------------------------------------


def greedy(model: GPT, tokens: int, **options) -> list[Step]:
    return list(generate_tokens(model, prompt(), tokens, GREEDY, **options))


def teacher_forced_logits(model: GPT, steps: list[Step]) -> torch.Tensor:
    """The logits one uncached pass over prompt + generated tokens gives at each generated position."""
    sequence = prompt() + [step.ids.item() for step in steps[:-1]]
    with torch.no_grad():
        logits = model(torch.tensor([sequence], device=DEVICE))[0][0]
    return logits[len(prompt()) - 1:]


def test_cached_and_uncached_decoding_agree() -> None:
    torch.set_float32_matmul_precision("highest")
    model = random_model()
    cached, plain = greedy(model, 40), greedy(model, 40, use_cache=False)
    # two float32 code paths: logits to 1e-4, tokens the same but at a near tie (after which texts differ)
    assert_decodings_agree(plain, cached, atol=1e-4)

    bf16 = random_model(torch.bfloat16)
    steps = greedy(bf16, 40)
    cached_logits = torch.stack([step.logits[0] for step in steps])
    assert relative_error(cached_logits, teacher_forced_logits(bf16, steps)) <= 16 * BF16_STEP


def cudagraph_skips() -> int:
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_decoding_with_cuda_graphs_gives_the_eager_greedy_text(dtype: torch.dtype) -> None:
    """`lm generate --compile`: the decode step compiled and captured as a CUDA graph ("reduce-overhead").
    float32 (TF32 off): logits to 1e-4, and the same tokens but at a near tie. bf16: the compiled kernels
    round differently, so the texts may part only at a near tie (top two eager logits within 16 bf16 steps),
    and the compiled logits match an uncached pass over the compiled text to 16 steps."""
    torch.set_float32_matmul_precision("highest")
    model = random_model(dtype)
    eager = greedy(model, 48)
    skips_before = cudagraph_skips()
    decoder = CompiledDecoder(model)
    stats = GenerationStats()
    compiled = greedy(model, 48, decoder=decoder, stats=stats)
    again = greedy(model, 48, decoder=decoder)  # replayed, not recorded again: still the same text
    assert cudagraph_skips() == skips_before, "torch.compile fell back from CUDA graphs (see TORCH_LOGS=perf_hints)"
    assert [s.ids.tolist() for s in again] == [s.ids.tolist() for s in compiled]
    if dtype == torch.float32:
        assert_decodings_agree(eager, compiled, atol=1e-4)
        return
    tolerance = 16 * BF16_STEP
    compiled_logits = torch.stack([step.logits[0] for step in compiled])
    assert relative_error(compiled_logits, teacher_forced_logits(model, compiled)) <= tolerance
    # a near tie: the top two eager logits within 16 bf16 steps of the largest magnitude (2 x 8 steps)
    assert_decodings_agree(eager, compiled, atol=0.0, rtol=tolerance / 2, compare_logits=False)


# --- checkpoints across devices ------------------------------------------------------------------------


def optimizer_state(trainer: Trainer) -> dict[str, dict[str, torch.Tensor]]:
    names = {id(p): name for name, p in trainer.model.named_parameters()}
    return {names[id(p)]: {k: v.detach().cpu() for k, v in s.items()} for p, s in trainer.optimizers[0].state.items()}


def assert_same_state(a: Trainer, b: Trainer) -> None:
    weights_a, weights_b = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(weights_a[k].cpu(), weights_b[k].cpu()) for k in weights_a)
    state_a, state_b = optimizer_state(a), optimizer_state(b)
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        for key in state_a[name]:
            assert torch.equal(state_a[name][key], state_b[name][key]), f"optimizer {key} of {name}"


def test_a_checkpoint_written_on_the_gpu_resumes_on_the_cpu_and_back(sample_tokenizer, play_text: Path,
                                                                     tmp_path: Path) -> None:
    """Weights and AdamW state cross devices bit for bit; the losses of GPU 10 steps -> CPU 10 -> GPU 10
    equal an all-CPU run's to 1e-3 (float32, TF32 off; the kernels of the two devices round differently)."""
    def trainer(run: Path, device: str, resume: bool) -> Trainer:
        made = Trainer(make_setup(run, sample_tokenizer, play_text, resume=resume, device=device,
                                  dtype="float32", max_steps=30, eval_every=10))
        torch.set_float32_matmul_precision("highest")  # the Trainer allowed TF32 on CUDA
        return made

    reference = tmp_path / "cpu"
    trainer(reference, "cpu", resume=False).run()

    run = tmp_path / "moved"
    on_gpu = trainer(run, DEVICE, resume=False)
    assert on_gpu.run(should_stop=lambda: on_gpu.step == 10).status == "interrupted"
    on_cpu = trainer(run, "cpu", resume=True)
    assert on_cpu.step == 10 and next(on_cpu.model.parameters()).device.type == "cpu"
    assert_same_state(on_gpu, on_cpu)
    assert on_cpu.run(should_stop=lambda: on_cpu.step == 20).status == "interrupted"
    back = trainer(run, DEVICE, resume=True)
    assert back.step == 20 and next(back.model.parameters()).device.type == DEVICE
    assert all(s["step"].device.type == DEVICE for s in back.optimizers[0].state.values())  # fused AdamW wants it there
    assert_same_state(on_cpu, back)
    assert back.run().status == "finished"

    moved, straight = losses(run), losses(reference)
    assert len(moved) == len(straight) == 30
    assert max(abs(a - b) for a, b in zip(moved, straight, strict=True)) <= 1e-3
    assert checkpoint.load_run(run)[0].num_parameters() == back.model.num_parameters()


# --- processes: NCCL and FSDP2 at world size 1 ---------------------------------------------------------

SMALL = ["-T", "16", "--n-layer", "1", "--n-head", "2", "--d-model", "16", "--vocab-size", "300",
         "--val-fraction", "0.1", "--eval-every", "5", "--log-every", "1", "--sample-tokens", "8",
         "--device", "cuda", "--dtype", "float32", "-B", "8", "--warmup-steps", "50", "--max-steps", "10"]


def lm_train(run: Path, *launcher: str, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """`lm train` in a fresh process (through `launcher`, e.g. torchrun), with a time limit."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "LM_DIST_TIMEOUT": "120", "NCCL_DEBUG": "INFO", "COLUMNS": "120"}
    command = [sys.executable, *launcher, "-m", "lm", "train", str(SAMPLE), *SMALL, *extra, "--out", str(run)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=SUBPROCESS_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


TORCHRUN_ONE = ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1")


@pytest.fixture(scope="module")
def one_plain_process(tmp_path_factory: pytest.TempPathFactory) -> list[float]:
    run = tmp_path_factory.mktemp("plain") / "run"
    lm_train(run)
    return losses(run)


@pytest.mark.parametrize("mode", ["--ddp", "--fsdp"])
def test_training_through_nccl_at_world_size_one(mode: str, one_plain_process: list[float], tmp_path: Path) -> None:
    """`lm train` under torchrun with one process: a NCCL process group, DDP (or FSDP2's fully_shard) over
    one GPU, the same losses as a plain process to 1e-4. (`lm train --nproc 1` itself runs without a
    process group; torchrun by hand is the documented way to get one.)"""
    run = tmp_path / "run"
    result = lm_train(run, *TORCHRUN_ONE, extra=(mode,))
    assert "NCCL" in result.stdout + result.stderr  # NCCL_DEBUG=INFO: the collectives went through NCCL
    together = losses(run)
    assert len(together) == 10
    assert max(abs(a - b) for a, b in zip(together, one_plain_process, strict=True)) <= 1e-4
    assert json.loads((run / "train_state" / "latest.json").read_text())["step"] == 10
