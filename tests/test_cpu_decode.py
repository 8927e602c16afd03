"""lm's C decode step (lm/cpu_decode.py) computes what the model's own forward pass does."""

import json
import os
from pathlib import Path

import pytest
import torch

from lm import cpu_kernels
from lm.config import ModelConfig
from lm.cpu_decode import CpuDecoder, cpu_decoder_for
from lm.generate import prepare_for_generation
from lm.model import GPT, KVCache

pytestmark = pytest.mark.skipif(cpu_kernels.load() is None, reason="lm's CPU kernels did not build here (no cc)")

FAMILIES = {
    "gpt2": {},
    "llama": {"pos_encoding": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False},
    "qwen3": {"pos_encoding": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False, "qk_norm": True},
    "relu2, sinusoidal": {"mlp": "relu2", "pos_encoding": "sinusoidal"},
}


@pytest.mark.parametrize("quantize", ["none", "int8"])
@pytest.mark.parametrize("family", FAMILIES, ids=list(FAMILIES))
@pytest.mark.parametrize("batch", [1, 2])
def test_cpu_decoder_computes_what_forward_does(quantize: str, family: str, batch: int) -> None:
    torch.manual_seed(0)
    # d_model 40: rows that are not a multiple of the kernels' 16 floats or 64 bytes
    config = ModelConfig(vocab_size=61, context_length=16, n_layer=2, n_head=2, d_model=40, **FAMILIES[family])
    model = prepare_for_generation(GPT(config), quantize=quantize)
    decoder = cpu_decoder_for(model)
    assert decoder is not None
    ids = torch.randint(0, 61, (batch, 16))
    general, native = KVCache(config, batch), KVCache(config, batch)
    with torch.inference_mode():
        model(ids[:, :3], cache=general)
        model(ids[:, :3], cache=native)
        for position in range(3, 16):
            expected = model(ids[:, position:position + 1], cache=general)[0][:, -1]
            torch.testing.assert_close(decoder.step(ids[:, position:position + 1], native), expected,
                                       atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(native.keys, general.keys, atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="context length"):
        decoder.step(ids[:, :1], native)  # full: refused, not written out of bounds
    native.length = 3
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 61\)"):
        decoder.step(torch.full((batch, 1), 61), native)  # past the vocabulary: refused before any write
    assert native.length == 3


def test_the_decoder_does_not_take_weights_in_the_transposed_layout() -> None:
    from lm.model import use_decoding_layout

    model = use_decoding_layout(GPT(ModelConfig(vocab_size=61, context_length=8, n_layer=1, n_head=2,
                                                d_model=32)).eval())
    assert not CpuDecoder.supports(model)
    assert cpu_decoder_for(model) is None


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))


@pytest.mark.parametrize(("march", "name", "needs"), [("x86-64-v3", "avx2", {"avx2", "fma"}),
                                                      ("x86-64", "portable", set())])
def test_the_avx2_and_plain_c_builds_compute_what_this_cpu_s_does(march: str, name: str, needs: set) -> None:
    """Other CPUs get other code paths: build them here and hold their products equal to this CPU's."""
    import ctypes
    import platform

    from torch import nn

    from lm.int8 import Int8Linear

    if platform.machine().lower() not in ("x86_64", "amd64") or not needs <= _cpu_flags():
        pytest.skip(f"this CPU cannot run the {march} build")
    other = cpu_kernels.open_library(cpu_kernels.build(march))
    assert other.lm_kernel_name().decode() == name
    native = cpu_kernels.load()
    generator = torch.Generator().manual_seed(0)
    dense = nn.Linear(200, 36)  # 200: not a multiple of 16 floats, nor of 64 bytes
    with torch.no_grad():
        dense.weight.copy_(torch.randn(36, 200, generator=generator))
    quantized = Int8Linear(dense)
    float_spec = cpu_kernels.LinearSpec(dense.weight.data_ptr(), None, None, None, dense.bias.data_ptr(), 200, 36, 200)
    # One row takes the one-row paths; 3 rows the row-by-row loop; 8 and 9 the AVX2 build's tiles of two
    # activation rows (9: an odd row out).
    for rows in (1, 3, 8, 9):
        x = torch.randn(rows, 200, generator=generator)
        for spec, exact in ((quantized.spec(), True), (float_spec, False)):
            outputs = []
            for library in (native, other):
                out = torch.empty(rows, 36)
                library.lm_linear(ctypes.byref(spec), x.data_ptr(), out.data_ptr(), rows, quantized.scratch(rows))
                outputs.append(out)
            if exact:  # integer sums: the same in any order
                torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-6, atol=1e-6)
            else:
                torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-4)
                with torch.no_grad():
                    torch.testing.assert_close(outputs[1], dense(x), rtol=1e-5, atol=1e-4)


def test_a_model_quantized_after_decoding_gets_a_new_decoder_and_copies_are_plain() -> None:
    """The decoder reads raw addresses: replacing layers must not leave it reading freed weights."""
    import copy

    from lm.int8 import quantize_int8

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=61, context_length=8, n_layer=1, n_head=2, d_model=32)
    model = prepare_for_generation(GPT(config))
    first = cpu_decoder_for(model)
    assert cpu_decoder_for(model) is first  # made once
    duplicate = copy.deepcopy(model)  # no C structures ride along
    quantize_int8(model)
    second = cpu_decoder_for(model)
    assert second is not first
    ids = torch.randint(0, 61, (1, 5))
    with torch.inference_mode():
        for m, decoder in ((model, second), (duplicate, cpu_decoder_for(duplicate))):
            general, native = KVCache(config, 1), KVCache(config, 1)
            m(ids[:, :4], cache=general)
            m(ids[:, :4], cache=native)
            torch.testing.assert_close(decoder.step(ids[:, 4:], native), m(ids[:, 4:], cache=general)[0][:, -1],
                                       atol=2e-5, rtol=1e-5)


@pytest.fixture
def measured_builds(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[tuple[str, tuple[str, ...]]]:
    """No LM_CPU_MARCH, an empty cache folder, nothing decided yet, and the builds timed here: this CPU's
    own and plain C (which every x86-64 CPU runs). Returns the probe calls, in order, as they happen."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the builds are chosen between on x86-64 CPUs only")
    monkeypatch.delenv(cpu_kernels.MARCH_ENV, raising=False)
    monkeypatch.setenv("LM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_kernels, "candidate_marches", lambda: ("native", "x86-64"))
    cpu_kernels.forget_decode_marches()
    calls: list[tuple[str, tuple[str, ...]]] = []
    real_probe = cpu_kernels.probe

    def recording_probe(layers, rows, marches, rounds=15):
        calls.append((cpu_kernels.layers_key(layers, rows), tuple(marches)))
        return real_probe(layers, rows, marches, rounds)

    monkeypatch.setattr(cpu_kernels, "probe", recording_probe)
    yield calls
    cpu_kernels.forget_decode_marches()


def _small_model(d_model: int = 64) -> GPT:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=61, context_length=8, n_layer=2, n_head=2, d_model=d_model)
    return prepare_for_generation(GPT(config))


def test_the_decoder_times_the_builds_once_per_machine_model_shape_and_batch(measured_builds) -> None:
    # (the models stay referenced: a decoder reads its model's weights in place)
    model, same_shape, other_shape = _small_model(d_model=256), _small_model(d_model=256), _small_model(d_model=32)
    decoder = cpu_decoder_for(model)
    key = cpu_kernels.layers_key(decoder.linear_specs(), 1)
    assert key == "float32, 9 layers, 6 MiB, 1 rows"
    # Plain C (scalar float32 dot products) against this CPU's vector units on 6 MiB of weights: a margin of
    # several times, which load on the machine does not hide (on a 400 KiB model call overheads could).
    assert cpu_kernels.kernel_name(decoder.library(1)) == cpu_kernels.kernel_name(cpu_kernels.load("native"))
    assert measured_builds == [(key, ("native", "x86-64"))]
    decoder.library(1)
    cpu_decoder_for(same_shape).library(1)  # decided already
    assert len(measured_builds) == 1
    cpu_kernels.forget_decode_marches()  # a new process reads the decision from the cache folder
    cpu_decoder_for(model).library(1)
    assert len(measured_builds) == 1
    cached = json.loads((Path(os.environ["LM_CACHE_DIR"]) / cpu_kernels.CACHE_FILE).read_text())
    assert any(key in choices for choices in cached.values())
    decoder.library(3)  # three samples at once: rows of four, measured again
    cpu_decoder_for(other_shape).library(1)
    assert [key for key, _ in measured_builds[1:]] == ["float32, 9 layers, 6 MiB, 4 rows",
                                                      "float32, 9 layers, 104 KiB, 1 rows"]


def test_lm_cpu_march_forces_a_build_without_measuring(measured_builds, monkeypatch: pytest.MonkeyPatch) -> None:
    from lm.errors import UsageError

    monkeypatch.setenv(cpu_kernels.MARCH_ENV, "x86-64")
    model, other_shape = _small_model(), _small_model(d_model=32)
    assert cpu_kernels.kernel_name(cpu_decoder_for(model).library(1)) == "portable"
    assert measured_builds == []
    monkeypatch.setenv(cpu_kernels.MARCH_ENV, "pentium4")
    with pytest.raises(UsageError, match="LM_CPU_MARCH='pentium4' is not one of auto, native, x86-64-v3, x86-64"):
        cpu_decoder_for(other_shape).library(1)


def test_generate_decodes_with_the_measured_build_and_says_which(measured_builds,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from lm.generate import GenerationStats, generate_tokens
    from lm.sampling import SamplingConfig

    monkeypatch.setattr(cpu_kernels, "probe", lambda layers, rows, marches, rounds=15: "x86-64")
    model = _small_model()
    expected = [step.ids.tolist() for step in generate_tokens(model, [1, 2], 5, SamplingConfig(temperature=0.0),
                                                        use_cache=False)]
    stats = GenerationStats()
    tokens = [step.ids.tolist() for step in generate_tokens(model, [1, 2], 5, SamplingConfig(temperature=0.0),
                                                      stats=stats)]
    assert stats.kernels == "lm's C kernels (portable)"
    assert tokens == expected


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_rows_at_different_positions_decode_as_each_alone(family: str) -> None:
    """step_at: a server's batch, each row at its own position, in a static cache with spare rows."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=61, context_length=16, n_layer=2, n_head=2, d_model=40, **FAMILIES[family])
    model = prepare_for_generation(GPT(config))
    decoder = cpu_decoder_for(model)
    lengths = [3, 9]  # tokens each row has read; its next token goes at that position
    ids = torch.randint(0, 61, (2, 10))
    shared = KVCache(config, 3, static=True)  # a third, idle row: the kernel must leave it alone
    shared.keys[:, 2] = 7.0
    with torch.inference_mode():
        for row, length in enumerate(lengths):
            view = shared.view(slice(row, row + 1), length)
            view.positions = torch.arange(length)
            model(ids[row:row + 1, :length], cache=view)
        logits = decoder.step_at(torch.stack([ids[r, n] for r, n in enumerate(lengths)])[:, None], shared,
                                 torch.tensor(lengths))
        for row, length in enumerate(lengths):
            alone = model(ids[row:row + 1, :length + 1])[0][:, -1]
            torch.testing.assert_close(logits[row:row + 1], alone, atol=2e-5, rtol=1e-5)
    assert (shared.keys[:, 2] == 7.0).all()
    with pytest.raises(ValueError, match="context length"):
        decoder.step_at(ids[:, :1], shared, torch.tensor([3, 16]))
    with pytest.raises(ValueError, match="fewer than the batch"):
        decoder.step_at(torch.zeros(4, 1, dtype=torch.long), shared, torch.zeros(4))
