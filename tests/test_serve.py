"""`lm serve`: the scheduler's continuous batching (lm/serving.py), the per-row positions it decodes with
(lm/model.py), and the OpenAI-compatible HTTP server (cli/openai_api.py) driven by the official client.

The runs: a base run trained for a few steps through the library, and a chat run made from it the way
`--init-from` makes one (`add_chat_tokens` + `grow_vocab`), then taught four short conversations so that
it answers them and ends its turn. Servers bind 127.0.0.1 on a free port, in a thread, and stop.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
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

try:  # the official client and the `serve` extra, in `dev`: without them the server's tests skip, the rest run
    import openai
    import uvicorn

    from lm.cli.openai_api import ServedRun, create_app
    from lm.cli.serve import load_runs
except ImportError:
    openai = uvicorn = None
needs_server = pytest.mark.skipif(openai is None, reason="needs the serve extra and openai: pip install -e '.[dev]'")

KEY = "test-key"
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


# The HTTP server -----------------------------------------------------------------------------------


@dataclass
class Server:
    url: str
    runs: list[ServedRun]

    def client(self, key: str | None = KEY, **options) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key=key or "none", **{"max_retries": 0, "timeout": 30, **options})

    def scheduler(self, name: str) -> Scheduler:
        return next(run.scheduler for run in self.runs if run.name == name)


@contextlib.contextmanager
def serving(runs: Runs, *, max_batch: int = 8, max_queue: int = 16, api_key: str | None = KEY) -> Iterator[Server]:
    served = load_runs([runs.chat, runs.base], torch.device("cpu"), "float32", "none", max_batch, max_queue)
    server = uvicorn.Server(uvicorn.Config(create_app(served, api_key), log_level="warning", access_log=False))
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))  # a free port, held from here on: no other test can take it
    port = listening.getsockname()[1]
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listening]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield Server(f"http://127.0.0.1:{port}/v1", served)
    finally:
        server.should_exit = True
        thread.join(20)
        listening.close()
        assert not thread.is_alive(), "the server did not stop"


@pytest.fixture(scope="module")
def server(runs: Runs) -> Iterator[Server]:
    with serving(runs) as running:
        yield running


def post(url: str, body: bytes | dict, key: str | None = KEY) -> tuple[int, dict]:
    """A raw request (for bodies the official client would never send): status and JSON body."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@needs_server
def test_models_are_listed_by_their_folder_names(server: Server) -> None:
    models = server.client().models.list()
    assert [model.id for model in models.data] == ["chat", "base"]
    assert server.client().models.retrieve("base").id == "base"


@needs_server
def test_chat_through_the_official_client_whole_and_streamed(server: Server) -> None:
    client = server.client()
    for user, reply in TAUGHT:
        answer = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": user}],
                                                temperature=0)
        assert answer.object == "chat.completion" and answer.model == "chat"
        assert answer.choices[0].message.content == reply and answer.choices[0].finish_reason == "stop"
        assert answer.usage.completion_tokens == len(client_tokens(server, reply)) + 1
    stream = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "Say something "
                                            "in French."}], temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices]
    assert "".join(pieces) == "Très bien 👍" and "\ufffd" not in "".join(pieces)  # whole characters only
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == answer_tokens("Très bien 👍", server)


def client_tokens(server: Server, text: str) -> list[int]:
    return server.runs[0].tokenizer.encode(text)


def answer_tokens(reply: str, server: Server) -> int:
    return len(client_tokens(server, reply)) + 1


@needs_server
def test_completions_whole_and_streamed_agree(server: Server) -> None:
    client = server.client()
    whole = client.completions.create(model="base", prompt="ROMEO:", max_tokens=20, temperature=0)
    assert whole.object == "text_completion" and whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 20 and whole.usage.prompt_tokens == 1 + len(client_tokens(server, "ROMEO:"))
    chunks = list(client.completions.create(model="base", prompt="ROMEO:", max_tokens=20, temperature=0,
                                            stream=True))
    assert "".join(chunk.choices[0].text for chunk in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert client.completions.create(model="base", prompt="ROMEO:", temperature=0).usage.completion_tokens == 16
    text = whole.choices[0].text
    stop = text[5:8]
    cut = client.completions.create(model="base", prompt="ROMEO:", max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"


@needs_server
def test_a_seed_gives_repeatable_text(server: Server) -> None:
    client = server.client()

    def sample(seed: int) -> str:
        return client.completions.create(model="base", prompt="The king", max_tokens=24, temperature=1.0,
                                         top_p=0.95, seed=seed, extra_body={"top_k": 40}).choices[0].text

    assert sample(3) == sample(3)
    assert len({sample(3), sample(4), sample(5)}) > 1
    chat = [client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "Who?"}],
                                           max_completion_tokens=12, temperature=1.2, seed=9)
            .choices[0].message.content for _ in range(2)]
    assert chat[0] == chat[1]


@needs_server
def test_sixteen_concurrent_streams_each_get_their_own_text(server: Server) -> None:
    client = server.client()
    words = ["Hark", "Nay", "Alas", "Fie", "Come", "Soft", "Peace", "Good"]

    def ask_for(index: int, stream: bool) -> tuple[str, str | None]:
        options = {"temperature": 0, "max_tokens": 6 + 3 * index, "stream": stream}
        if index % 2:
            response = client.chat.completions.create(
                model="chat", messages=[{"role": "user", "content": f"{words[index % 8]}, {index}?"}], **options)
            if not stream:
                return response.choices[0].message.content, response.choices[0].finish_reason
            chunks = [chunk.choices[0] for chunk in response if chunk.choices]
            return "".join(c.delta.content or "" for c in chunks), chunks[-1].finish_reason
        response = client.completions.create(model="chat", prompt=f"{words[index % 8]}, said {index}", **options)
        if not stream:
            return response.choices[0].text, response.choices[0].finish_reason
        chunks = [chunk.choices[0] for chunk in response]
        return "".join(c.text for c in chunks), chunks[-1].finish_reason

    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda index: ask_for(index, stream=True), range(16)))
    assert server.scheduler("chat").counts().peak_batch > 4  # decoded together, not one after another
    alone = [ask_for(index, stream=False) for index in range(16)]
    assert together == alone
    assert len({text for text, _ in together}) > 8


@needs_server
def test_a_client_dropped_mid_stream_frees_its_row(runs: Runs, monkeypatch) -> None:
    with serving(runs, max_batch=1, max_queue=0) as server:
        scheduler = server.scheduler("base")
        step = scheduler.step
        monkeypatch.setattr(scheduler, "step", lambda: time.sleep(0.02) or step())  # 100 tokens: 2 s
        client = server.client()
        stream = client.completions.create(model="base", prompt="ROMEO:", max_tokens=100, temperature=0,
                                           stream=True)
        received = [chunk for chunk, _ in zip(stream, range(3), strict=False)]
        assert len(received) == 3
        stream.close()
        deadline = time.monotonic() + 5
        while scheduler.counts().active and time.monotonic() < deadline:
            time.sleep(0.01)
        counts = scheduler.counts()
        assert (counts.active, counts.cancelled, counts.finished) == (0, 1, 0)
        again = client.completions.create(model="base", prompt="ROMEO:", max_tokens=3, temperature=0)
        assert again.usage.completion_tokens == 3  # the row was free at once (max_queue 0: no waiting)
        with pytest.raises(openai.APITimeoutError):  # a whole answer's client that gives up goes away too
            server.client(timeout=0.3).completions.create(model="base", prompt="ROMEO:", max_tokens=100)
        deadline = time.monotonic() + 5
        while (scheduler.counts().cancelled < 2 or scheduler.counts().active) and time.monotonic() < deadline:
            time.sleep(0.01)
        counts = scheduler.counts()
        assert (counts.active, counts.cancelled, counts.finished) == (0, 2, 1)


@needs_server
def test_a_full_queue_gets_429(runs: Runs, monkeypatch) -> None:
    with serving(runs, max_batch=1, max_queue=1) as server:
        scheduler = server.scheduler("chat")
        gate = threading.Event()
        step = scheduler.step
        monkeypatch.setattr(scheduler, "step", lambda: gate.wait(10) and step())  # nothing decodes until the gate
        client = server.client()
        messages = [{"role": "user", "content": "Hello!"}]
        first, second = (client.chat.completions.create(model="chat", messages=messages, temperature=0, stream=True)
                         for _ in range(2))
        with pytest.raises(openai.RateLimitError) as refused:
            client.chat.completions.create(model="chat", messages=messages, temperature=0)
        assert_openai_error(refused.value.status_code, refused.value.body, 429, "busy")
        gate.set()
        for stream in (first, second):
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "Hi there."


def assert_openai_error(status: int, body: dict, expected_status: int, *needles: str) -> None:
    error = body.get("error", body)  # the client hands over the "error" object itself
    assert status == expected_status, (status, body)
    assert set(error) == {"message", "type", "param", "code"}, body
    for needle in needles:
        assert needle in error["message"], (needle, error)


@needs_server
@pytest.mark.parametrize(("path", "body", "status", "needles"), [
    ("completions", b"{not json", 400, ["not JSON"]),
    ("completions", b"[1, 2]", 400, ["not an object"]),
    ("completions", {"model": "base", "prompt": "Hi", "temperature": "hot"}, 400, ["temperature must be a number"]),
    ("completions", {"model": "base", "prompt": "Hi", "temperature": 2.5}, 400, ["from 0 to 2"]),
    ("completions", {"model": "base", "prompt": "Hi", "top_p": 1.5}, 400, ["top_p"]),
    ("completions", {"model": "base", "prompt": "Hi", "max_tokens": 0}, 400, ["max_tokens must be at least 1"]),
    ("completions", {"model": "base", "prompt": "Hi", "max_tokens": True}, 400, ["max_tokens must be an integer"]),
    ("completions", {"model": "base", "prompt": "Hi", "stop": ["a", "b", "c", "d", "e"]}, 400, ["at most 4"]),
    ("completions", {"model": "base", "prompt": "Hi", "seed": 1.5}, 400, ["seed must be an integer"]),
    ("completions", {"model": "base", "prompt": "Hi", "n": 2}, 400, ["n=1"]),
    ("completions", {"model": "base", "prompt": 7}, 400, ["prompt"]),
    ("completions", {"model": "base", "prompt": "Hi", "stream_options": {"include_usage": True}}, 400,
     ["stream: true"]),
    ("completions", {"prompt": "Hi"}, 400, ["'model' must name"]),
    ("completions", {"model": "nope", "prompt": "Hi"}, 404, ["'nope' does not exist", "chat, base"]),
    ("completions", {"model": "base", "prompt": "Hi " * 300}, 400,
     [f"tokens but the model 'base' reads at most {CONTEXT}", "shorten the prompt"]),
    ("chat/completions", {"model": "base", "messages": [{"role": "user", "content": "Hi"}]}, 400,
     ["base model", "fine-tune it on conversations"]),
    ("chat/completions", {"model": "chat", "messages": [{"role": "assistant", "content": "Hi"}]}, 400,
     ["message 1 is assistant where user was expected"]),
    ("chat/completions", {"model": "chat", "messages": [{"role": "wizard", "content": "Hi"}]}, 400, ["role"]),
    ("chat/completions", {"model": "chat", "messages": "Hi"}, 400, ["'messages' must be a list"]),
    ("chat/completions", {"model": "chat", "messages": [{"role": "user", "content": "Hi " * 300}]}, 400,
     ["nothing is left for the reply"]),
    ("embeddings", {"model": "chat", "input": "Hi"}, 404, ["no route POST /v1/embeddings"]),
])
@needs_server
def test_bad_requests_get_their_status_and_an_openai_error(server: Server, path: str, body, status: int,
                                                           needles: list[str]) -> None:
    assert_openai_error(*post(f"{server.url}/{path}", body), status, *needles)


@needs_server
def test_the_key_is_required_and_checked(server: Server) -> None:
    request = {"model": "base", "prompt": "Hi", "max_tokens": 2}
    assert_openai_error(*post(f"{server.url}/completions", request, key=None), 401, "no API key")
    assert_openai_error(*post(f"{server.url}/completions", request, key="wrong"), 401, "wrong API key")
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").models.list()
    assert post(f"{server.url}/completions", request)[0] == 200


@needs_server
def test_the_official_client_sees_typed_errors(server: Server) -> None:
    client = server.client()
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="gpt-4", prompt="Hi")
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as long:
        client.completions.create(model="base", prompt="Hi " * 300)
    assert long.value.code == "context_length_exceeded"


@needs_server
def test_each_request_is_logged_on_one_line(server: Server, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="lm.serve"):
        server.client().completions.create(model="base", prompt="ROMEO:", max_tokens=3, temperature=0)
        post(f"{server.url}/completions", {"model": "nope", "prompt": "Hi"})
    lines = [record.getMessage() for record in caplog.records if record.name == "lm.serve"]
    assert len(lines) == 2
    assert lines[0].startswith("POST /v1/completions 200 model=base tokens=") and lines[0].endswith("s")
    assert lines[1].startswith("POST /v1/completions 404 ") and "does not exist" in lines[1]


# The command ---------------------------------------------------------------------------------------


def test_help_says_what_binding_every_address_exposes() -> None:
    from typer.testing import CliRunner

    from lm.cli.main import app

    result = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "0.0.0.0" in text and "anyone there can run the models" in text and "--api-key" in text


@needs_server
def test_without_the_serve_extra_the_command_says_how_to_install_it(runs: Runs, monkeypatch, capsys) -> None:
    import importlib.util

    import lm.cli.serve
    from lm.cli.main import main

    real = importlib.util.find_spec
    monkeypatch.setattr(lm.cli.serve.importlib.util, "find_spec",
                        lambda name, *args: None if name == "uvicorn" else real(name, *args))
    with pytest.raises(SystemExit) as exited:
        main(["serve", str(runs.chat)])
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip() == ("error: lm serve needs uvicorn; install with: "
                                               "pip install 'lm-from-text[serve]'")
