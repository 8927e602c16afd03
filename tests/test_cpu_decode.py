"""lm's C decode step (lm/cpu_decode.py) computes what the model's own forward pass does."""

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


def test_the_decoder_does_not_take_weights_in_the_transposed_layout() -> None:
    from lm.model import use_decoding_layout

    model = use_decoding_layout(GPT(ModelConfig(vocab_size=61, context_length=8, n_layer=1, n_head=2,
                                                d_model=32)).eval())
    assert not CpuDecoder.supports(model)
    assert cpu_decoder_for(model) is None
