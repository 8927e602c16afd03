"""Serving: the per-row positions continuous batching decodes with (lm/model.py) and the chat format a
run directory records (lm/chat.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lm.chat import CHAT_FORMAT_FILE, ChatFormat, load_chat_format, save_chat_format
from lm.config import ModelConfig
from lm.errors import InputError
from lm.model import GPT, KVCache

# The chat format a run directory records ------------------------------------------------------------


def test_a_run_records_its_chat_format_and_a_base_run_has_none(tmp_path: Path) -> None:
    assert load_chat_format(tmp_path) is None
    custom = ChatFormat(system="<|sys|>", end="<|eot|>", begin=None)
    save_chat_format(tmp_path, custom)
    assert load_chat_format(tmp_path) == custom
    (tmp_path / CHAT_FORMAT_FILE).write_text('{"user": ', encoding="utf-8")
    with pytest.raises(InputError, match=r"cannot be read as JSON.*damaged"):
        load_chat_format(tmp_path)
    (tmp_path / CHAT_FORMAT_FILE).write_text('{"speaker": "<|s|>"}', encoding="utf-8")
    with pytest.raises(InputError, match="is not a chat format"):
        load_chat_format(tmp_path)


# Per-row positions in the KV cache -------------------------------------------------------------------


@pytest.mark.parametrize("pos_encoding", ["learned", "rope"])
def test_rows_at_different_positions_decode_as_each_would_alone(pos_encoding: str) -> None:
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=61, context_length=32, n_layer=2, n_head=2, d_model=32,
                            pos_encoding=pos_encoding)).eval()
    prompts = [torch.randint(0, 61, (length,)) for length in (3, 11, 7)]
    nexts = torch.randint(0, 61, (3,))
    with torch.inference_mode():
        alone = []
        for prompt, token in zip(prompts, nexts, strict=True):
            sequence = torch.cat([prompt, token[None]])[None]
            alone.append(model(sequence)[0][0, -1])
        cache = KVCache(model.config, 3, static=True)
        for row, prompt in enumerate(prompts):
            view = cache.view(slice(row, row + 1), len(prompt))
            view.positions = torch.arange(len(prompt))
            model(prompt[None], cache=view)
        view = cache.view(slice(0, 3), 12)
        view.positions = torch.tensor([[len(prompt)] for prompt in prompts])
        batched = model(nexts[:, None], cache=view)[0][:, -1]
    torch.testing.assert_close(batched, torch.stack(alone), atol=1e-5, rtol=1e-5)


def test_one_shared_position_per_call_still_works_as_before() -> None:
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=61, context_length=16, n_layer=1, n_head=2, d_model=16,
                            pos_encoding="rope")).eval()
    ids = torch.randint(0, 61, (2, 5))
    cache = KVCache(model.config, 2, static=True)
    cache.positions = torch.arange(5)
    with torch.inference_mode():
        torch.testing.assert_close(model(ids, cache=cache)[0], model(ids)[0], atol=1e-5, rtol=1e-5)
