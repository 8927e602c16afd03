"""Serving: the scheduler's continuous batching (lm/serving.py), the per-row positions it decodes with
(lm/model.py) and the chat format a run directory records (lm/chat.py).

The runs: a base run trained for a few steps through the library, and a chat run made from it the way
`--init-from` makes one (`add_chat_tokens` + `grow_vocab`), then taught four short conversations so that
it answers them and ends its turn.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import SAMPLE

from lm import rundir
from lm.chat import (
    CHAT_FORMAT_FILE,
    DEFAULT_CHAT_FORMAT,
    ChatFormat,
    add_chat_tokens,
    grow_vocab,
    load_chat_format,
    render,
    save_chat_format,
)
from lm.checkpoint import load_run, model_state_dict, save_checkpoint
from lm.config import ModelConfig, TrainConfig
from lm.data import split_text, tokenize_split
from lm.errors import InputError
from lm.model import GPT, KVCache
from lm.sampling import SamplingConfig
from lm.serving import ContextOverflow, GenerationRequest, QueueFull, Scheduler, Update
from lm.train import Trainer, TrainingSetup

GREEDY = SamplingConfig(temperature=0.0)
CONTEXT = 128
TAUGHT = [("Hello!", "Hi there."), ("What is your name?", "I am a tiny model."),
          ("Say something in French.", "Très bien 👍"), ("Count to three.", "One, two, three.")]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    # Tiny matrices: a second thread only adds waiting, and on a busy machine a lot of it.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass
class Runs:
    base: Path
    chat: Path


def train_base(run: Path, tokenizer) -> None:
    model = ModelConfig(vocab_size=tokenizer.vocab_size, context_length=CONTEXT, n_layer=2, n_head=2, d_model=64)
    train = TrainConfig(max_steps=30, batch_size=8, lr=3e-3, warmup_steps=5, eval_every=30, eval_batches=1,
                        log_every=30, sample_tokens=0, val_fraction=0.1, device="cpu")
    splits = tokenize_split(split_text([SAMPLE], None, train.val_fraction), tokenizer,
                            cache_root=run.parent / "token-cache")
    rundir.prepare_run_dir(run, resume=False, force=True)
    Trainer(TrainingSetup(run, model, train, tokenizer, splits)).run()


def teach(model: GPT, tokenizer, exchanges: list[tuple[str, str]], max_steps: int = 400) -> None:
    """Fit the assistant turns of `exchanges` (masked next-token loss) until the model knows them by heart."""
    rendered = [render([{"role": "user", "content": user}, {"role": "assistant", "content": reply}], tokenizer)
                for user, reply in exchanges]
    width = max(len(r.inputs) for r in rendered)
    inputs = torch.zeros(len(rendered), width, dtype=torch.long)
    targets, mask = torch.zeros_like(inputs), torch.zeros(len(rendered), width, dtype=torch.bool)
    for row, conversation in enumerate(rendered):
        length = len(conversation.inputs)
        inputs[row, :length] = torch.tensor(conversation.inputs)
        targets[row, :length] = torch.tensor(conversation.targets)
        mask[row, :length] = torch.tensor(conversation.target_mask)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)  # 1e-2 diverges mid-way
    for _ in range(max_steps):
        loss = torch.nn.functional.cross_entropy(model(inputs)[0][mask], targets[mask])
        if loss.item() < 0.005:  # about 200 steps
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.02, f"the chat model did not learn its conversations (loss {loss.item():.3f})"
    model.eval()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, sample_tokenizer) -> Runs:
    root = tmp_path_factory.mktemp("serve")
    base, chat = root / "base", root / "chat"
    train_base(base, sample_tokenizer)
    model, tokenizer, info = load_run(base)
    tokenizer = add_chat_tokens(tokenizer)
    grow_vocab(model, tokenizer.vocab_size)
    teach(model, tokenizer, TAUGHT)
    chat.mkdir()
    save_checkpoint(chat, model_state_dict(model), {}, step=1)
    tokenizer.save(chat / rundir.TOKENIZER)
    rundir.write_config(chat, model.config, info.train, info.extra)
    save_chat_format(chat, DEFAULT_CHAT_FORMAT)
    return Runs(base, chat)


@pytest.fixture(scope="module")
def chat_model(runs: Runs):
    model, tokenizer, _ = load_run(runs.chat)
    return model, tokenizer


def ask(tokenizer, user: str) -> tuple[int, ...]:
    return tuple(render([{"role": "user", "content": user}], tokenizer, add_generation_prompt=True).ids)


def decode_all(scheduler: Scheduler, requests: list[GenerationRequest]) -> list[tuple[str, Update]]:
    """Submit every request, step until all are done; each one's text and last update."""
    texts: list[list[str]] = [[] for _ in requests]
    last: list[Update | None] = [None] * len(requests)

    def collect(index: int):
        def on_update(update: Update) -> None:
            texts[index].append(update.text)
            last[index] = update
        return on_update

    for index, request in enumerate(requests):
        scheduler.submit(request, collect(index))
    while scheduler.step():
        pass
    assert all(update is not None and update.finished for update in last)
    return [("".join(pieces), update) for pieces, update in zip(texts, last, strict=True)]


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


# The scheduler -------------------------------------------------------------------------------------


def test_sixteen_greedy_requests_batched_give_what_each_gives_alone(chat_model) -> None:
    model, tokenizer = chat_model
    prompts = [tuple(tokenizer.encode(f"{word}, said the {index}th")) for index, word in
               enumerate(["Hark", "Nay", "Good morrow", "Alas", "Fie", "Come", "Soft", "Peace"] * 2)]
    requests = [GenerationRequest(prompt, max_tokens=5 + 4 * index, sampling=GREEDY)
                for index, prompt in enumerate(prompts)]
    scheduler = Scheduler(model, tokenizer, max_batch=5, max_queue=16)  # rows free up and are taken mid-way
    together = decode_all(scheduler, requests)
    counts = scheduler.counts()
    assert counts.peak_batch == 5 and counts.finished == 16 and counts.active == counts.waiting == 0
    for request, (text, update) in zip(requests, together, strict=True):
        alone = decode_all(Scheduler(model, tokenizer, max_batch=1), [request])[0]
        assert (text, update) == alone
        assert update.finish_reason == "length" and update.completion_tokens == request.max_tokens
    assert len({text for text, _ in together}) > 8  # the rows did not all say the same thing


def test_a_seed_gives_the_same_sampled_text_in_any_batch(chat_model) -> None:
    model, tokenizer = chat_model
    sampled = SamplingConfig(temperature=1.0, top_k=0)
    request = GenerationRequest(tuple(tokenizer.encode("ROMEO:")), max_tokens=24, sampling=sampled, seed=42)
    others = [GenerationRequest(tuple(tokenizer.encode(f"Line {i}")), 30, sampled, seed=i) for i in range(3)]
    alone = decode_all(Scheduler(model, tokenizer), [request])[0]
    crowded = decode_all(Scheduler(model, tokenizer), [*others, request])[-1]
    assert alone == crowded
    other_seed = decode_all(Scheduler(model, tokenizer), [GenerationRequest(request.prompt, 24, sampled, seed=7)])
    assert other_seed[0][0] != alone[0]


def test_replies_stop_at_the_end_of_turn_a_stop_string_or_the_budget(chat_model) -> None:
    model, tokenizer = chat_model
    end = tokenizer.special_tokens["<|end|>"]
    stop_ids = frozenset({end, tokenizer.eot_id})
    scheduler = Scheduler(model, tokenizer)
    replies = decode_all(scheduler, [GenerationRequest(ask(tokenizer, user), 40, GREEDY, stop_ids=stop_ids)
                                     for user, _ in TAUGHT])
    for (_, reply), (text, update) in zip(TAUGHT, replies, strict=True):
        assert (text, update.finish_reason) == (reply, "stop")  # the end-of-turn token's text is not shown
        assert update.completion_tokens == len(tokenizer.encode(reply)) + 1  # the end token counts
    prompt = ask(tokenizer, "Count to three.")
    (cut, update), (short, budget) = decode_all(scheduler, [
        GenerationRequest(prompt, 40, GREEDY, stop=(", thr",), stop_ids=stop_ids),
        GenerationRequest(prompt, 2, GREEDY, stop_ids=stop_ids)])
    assert (cut, update.finish_reason) == ("One, two", "stop")
    assert budget.finish_reason == "length" and budget.completion_tokens == 2 and "One, two, three.".startswith(short)


def test_a_full_queue_and_a_prompt_past_the_context_are_refused(chat_model) -> None:
    model, tokenizer = chat_model
    scheduler = Scheduler(model, tokenizer, max_batch=2, max_queue=1)
    request = GenerationRequest((1, 2, 3), 5, GREEDY)
    tickets = [scheduler.submit(request, lambda update: None) for _ in range(3)]  # two rows and one queued
    with pytest.raises(QueueFull, match="busy"):
        scheduler.submit(request, lambda update: None)
    tickets[0].cancel()
    scheduler.submit(request, lambda update: None)  # the cancelled one left the queue
    with pytest.raises(ContextOverflow, match=f"the model's context holds {CONTEXT}") as raised:
        scheduler.submit(GenerationRequest(tuple(range(1, 101)), 29, GREEDY), lambda update: None)
    assert (raised.value.prompt_tokens, raised.value.max_tokens) == (100, 29)
    with pytest.raises(InputError, match="outside the vocabulary"):
        scheduler.submit(GenerationRequest((tokenizer.vocab_size,), 5, GREEDY), lambda update: None)


def test_a_cancelled_sequence_leaves_the_batch_and_its_row_is_taken(chat_model) -> None:
    model, tokenizer = chat_model
    scheduler = Scheduler(model, tokenizer, max_batch=1, max_queue=1)
    seen: list[Update] = []
    ticket = scheduler.submit(GenerationRequest((1, 2, 3), 50, GREEDY), seen.append)
    later = GenerationRequest(tuple(tokenizer.encode("Alas")), 6, GREEDY)
    waiting: list[Update] = []
    scheduler.submit(later, waiting.append)
    for _ in range(3):
        scheduler.step()
    assert scheduler.counts().active == 1 and not waiting
    ticket.cancel()
    updates_before = len(seen)
    while scheduler.step():
        pass
    assert len(seen) == updates_before  # nothing more for a cancelled request
    assert waiting[-1].finish_reason == "length"
    assert "".join(u.text for u in waiting) == decode_all(Scheduler(model, tokenizer, max_batch=1), [later])[0][0]
    counts = scheduler.counts()
    assert (counts.cancelled, counts.finished, counts.active) == (1, 1, 0)


def test_a_failed_step_ends_the_requests_it_held_and_the_loop_goes_on(chat_model, monkeypatch) -> None:
    model, tokenizer = chat_model
    scheduler = Scheduler(model, tokenizer)
    seen: list[Update] = []
    done = threading.Event()

    def on_update(update: Update) -> None:
        seen.append(update)
        if update.finished:
            done.set()

    broken = {"on": True}
    decode = scheduler._decode

    def failing_decode() -> None:
        if broken["on"]:
            raise RuntimeError("out of memory")
        decode()

    monkeypatch.setattr(scheduler, "_decode", failing_decode)
    thread = scheduler.start()
    scheduler.submit(GenerationRequest((1, 2, 3), 5, GREEDY), on_update)
    assert done.wait(10) and seen[-1].error == "generation failed: RuntimeError: out of memory"
    broken["on"], seen[:] = False, []
    done.clear()
    scheduler.submit(GenerationRequest((1, 2, 3), 5, GREEDY), on_update)
    assert done.wait(10) and seen[-1].finish_reason == "length"
    scheduler.close()
    thread.join(5)
    assert not thread.is_alive() and scheduler.counts().failed == 1


@pytest.mark.cuda
def test_batched_and_alone_agree_on_a_gpu(chat_model) -> None:
    import copy

    model, tokenizer = chat_model
    gpu = copy.deepcopy(model).to("cuda")
    sampled = SamplingConfig(temperature=1.0, top_k=0)
    requests = [GenerationRequest(tuple(tokenizer.encode(f"Line {i}")), 10 + 3 * i, GREEDY) for i in range(6)]
    requests += [GenerationRequest(tuple(tokenizer.encode(f"Verse {i}")), 20, sampled, seed=i) for i in range(3)]
    together = decode_all(Scheduler(gpu, tokenizer, max_batch=4), requests)
    assert together == [decode_all(Scheduler(gpu, tokenizer, max_batch=1), [request])[0] for request in requests]
