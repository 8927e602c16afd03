"""`lm chat` and its session: one KV cache kept across turns, replies that stop at the end of a turn,
the oldest exchanges dropped when the context fills, /reset, /system, /save, and a base run refused."""

from __future__ import annotations

import itertools
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import SAMPLE, write_run
from typer.testing import CliRunner

import lm.chat_session
from lm import rundir
from lm.chat import (
    ChatFormat,
    Message,
    add_chat_tokens,
    chat_token_ids,
    conversation_problem,
    conversation_start,
    grow_vocab,
    render,
    render_turn,
)
from lm.chat_session import CHAT_FORMAT_FILE, ChatSession, ContextTrimmed, TurnStats, chat_format_of
from lm.checkpoint import load_run, model_state_dict, save_checkpoint
from lm.cli.main import main
from lm.config import ModelConfig, TrainConfig
from lm.errors import InputError
from lm.generate import prepare_for_generation
from lm.model import GPT, KVCache
from lm.sampling import SamplingConfig
from lm.tokenizer import Tokenizer

CONTEXT = 96
GREEDY = SamplingConfig(temperature=0)


def train_briefly(tokenizer: Tokenizer, steps: int = 60, batch: int = 8) -> GPT:
    """A 2-layer model that has read the sample text for a few dozen AdamW steps (about a second)."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, context_length=CONTEXT, n_layer=2, n_head=2,
                            d_model=32))
    text = torch.tensor(tokenizer.encode(SAMPLE.read_text(encoding="utf-8")))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        starts = torch.randint(0, len(text) - CONTEXT - 1, (batch,)).tolist()
        inputs = torch.stack([text[start:start + CONTEXT] for start in starts])
        targets = torch.stack([text[start + 1:start + CONTEXT + 1] for start in starts])
        _, loss = model(inputs, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """The models here are tiny: a second thread only adds synchronisation (on a busy 2-core machine,
    training steps took 50x longer with two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory: pytest.TempPathFactory, sample_tokenizer: Tokenizer) -> Path:
    """A chat run as fine-tuning writes one: the chat tokens added, the vocabulary grown, the format recorded."""
    model = train_briefly(sample_tokenizer)
    tokenizer = add_chat_tokens(sample_tokenizer)
    grow_vocab(model, tokenizer.vocab_size)
    folder = tmp_path_factory.mktemp("chat") / "run"
    folder.mkdir()
    tokenizer.save(folder / rundir.TOKENIZER)
    rundir.write_config(folder, model.config, TrainConfig(), {"parameters": model.num_parameters()})
    save_checkpoint(folder, model_state_dict(model), {}, 60)
    (folder / CHAT_FORMAT_FILE).write_text(json.dumps(ChatFormat().to_dict()), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def loaded(chat_run: Path) -> tuple[GPT, Tokenizer]:
    model, tokenizer, _ = load_run(chat_run)
    return prepare_for_generation(model), tokenizer


def new_session(loaded: tuple[GPT, Tokenizer], **options) -> ChatSession:
    model, tokenizer = loaded
    return ChatSession(model, tokenizer, **{"sampling": GREEDY, "max_new_tokens": 12, "seed": 0, **options})


def say(session: ChatSession, text: str) -> tuple[str, TurnStats, list[ContextTrimmed]]:
    stats, pieces, trimmed = TurnStats(), [], []
    for item in session.reply(text, stats):
        (pieces if isinstance(item, str) else trimmed).append(item)
    return "".join(pieces), stats, trimmed


def turn_length(tokenizer: Tokenizer, role: str, text: str) -> int:
    return len(render_turn(Message(role, text), tokenizer))


def assert_cache_is_a_fresh_prefill(session: ChatSession) -> None:
    """The session's cache holds what one prefill of its whole conversation gives (to rounding: the
    turns were read in pieces and the replies one token at a time, by other kernels)."""
    ids = session.ids
    assert session.cached_tokens == len(ids) == session.cache.length
    model = session.model
    fresh = KVCache(model.config, 1)
    with torch.inference_mode():
        model(torch.tensor([ids]), cache=fresh)
    n = len(ids)
    torch.testing.assert_close(session.cache.keys[:, :, :, :n], fresh.keys[:, :, :, :n], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(session.cache.values[:, :, :, :n], fresh.values[:, :, :, :n], atol=1e-4, rtol=1e-4)


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch):
    """Make the session sample the given token ids in order, over and over."""

    def script(tokens: list[int]) -> None:
        queue = itertools.cycle(tokens)

        def fake_sample_next(logits, config, generator=None, seen=None) -> torch.Tensor:
            return torch.tensor([next(queue)])

        monkeypatch.setattr(lm.chat_session, "sample_next", fake_sample_next)

    return script


def word_ids(tokenizer: Tokenizer, count: int) -> list[int]:
    """`count` ordinary tokens that spell text (for scripted replies)."""
    return (tokenizer.encode(" the watchman holds the lamp and the ladder by the wall") * count)[:count]


# The cache is kept across turns -------------------------------------------------------------------


def test_the_second_turn_prefills_only_its_own_tokens(loaded) -> None:
    session = new_session(loaded, system="You answer in one line.")
    tokenizer = session.tokenizer
    _, first, _ = say(session, "Who holds the lamp?")
    _, second, _ = say(session, "And the ladder?")
    system = turn_length(tokenizer, "system", "You answer in one line.")
    assert first.prefill_tokens == 1 + system + turn_length(tokenizer, "user", "Who holds the lamp?") + 1
    assert second.prefill_tokens == turn_length(tokenizer, "user", "And the ladder?") + 1  # + <|assistant|>
    assert 1 <= second.decoded_tokens <= 12 and second.stop in ("end", "length")
    assert second.context_tokens == len(session.ids) == session.cached_tokens


def test_the_cache_after_two_turns_is_what_a_fresh_prefill_of_the_conversation_gives(loaded) -> None:
    session = new_session(loaded, system="Be terse.")
    for text in ("Who holds the lamp?", "Ünïcödé and emoji 🕯️ too"):
        say(session, text)
    assert_cache_is_a_fresh_prefill(session)
    tokenizer, turns = session.tokenizer, session.turns
    assert [turn.message.role for turn in turns] == ["system", "user", "assistant", "user", "assistant"]
    for turn in turns:  # every turn as render gives it; a reply's content as it was sampled
        expected = render_turn(turn.message, tokenizer).ids
        if turn.message.role != "assistant" or tokenizer.encode(turn.message.content) == list(turn.ids[1:-1]):
            assert list(turn.ids) == expected
    assert session.ids == conversation_start(tokenizer).ids + [id for turn in turns for id in turn.ids]
    if all(list(turn.ids) == render_turn(turn.message, tokenizer).ids for turn in turns):
        assert session.ids == render(session.messages, tokenizer).ids


def test_a_reply_stops_at_the_end_of_turn_token_and_closes_the_turn_in_the_cache(loaded, scripted) -> None:
    session = new_session(loaded)
    ids = chat_token_ids(session.tokenizer)
    words = word_ids(session.tokenizer, 3)
    scripted([*words, ids.end])
    text, stats, _ = say(session, "Speak.")
    assert text == session.tokenizer.decode(words) and stats.stop == "end" and stats.decoded_tokens == 4
    assert session.ids[-5:] == [ids.markers["assistant"], *words, ids.end]
    assert session.messages[-1] == Message("assistant", text)
    assert_cache_is_a_fresh_prefill(session)
    # <|endoftext|> in its place ends the reply too; the turn still closes with <|end|>.
    scripted([*words, session.tokenizer.eot_id])
    say(session, "Again.")
    assert session.ids[-5:] == [ids.markers["assistant"], *words, ids.end]
    assert_cache_is_a_fresh_prefill(session)


def test_max_new_tokens_ends_a_reply_and_the_turn_is_closed_all_the_same(loaded, scripted) -> None:
    session = new_session(loaded, max_new_tokens=5)
    scripted(word_ids(session.tokenizer, 50))
    _, stats, _ = say(session, "Speak at length.")
    assert stats.stop == "length" and stats.decoded_tokens == 5
    assert session.ids[-1] == chat_token_ids(session.tokenizer).end and len(session.turns[-1].ids) == 5 + 2
    assert_cache_is_a_fresh_prefill(session)


def test_the_same_seed_gives_the_same_replies(loaded) -> None:
    def replies(seed: int) -> list[str]:
        session = new_session(loaded, sampling=SamplingConfig(temperature=1.0), seed=seed)
        return [say(session, text)[0] for text in ("Hello there.", "How fares the night?")]

    assert replies(7) == replies(7)


def test_a_reply_left_early_is_kept_and_the_cache_stays_right(loaded, scripted) -> None:
    session = new_session(loaded)
    scripted(word_ids(session.tokenizer, 20))
    stream = session.reply("Speak.")
    first = next(item for item in stream if isinstance(item, str))
    stream.close()
    assert session.messages[-1].role == "assistant" and session.messages[-1].content.startswith(first)
    say(session, "Go on.")
    assert_cache_is_a_fresh_prefill(session)


# /reset and /system --------------------------------------------------------------------------------


def test_reset_forgets_the_exchanges_and_keeps_the_system_prompt_in_the_cache(loaded) -> None:
    session = new_session(loaded, system="Be terse.")
    say(session, "Who holds the lamp?")
    session.reset()
    assert session.messages == [Message("system", "Be terse.")]
    _, stats, _ = say(session, "Hello.")
    # The start and the system prompt stayed cached, and so did the <|user|> that opened the forgotten turn
    # at the same position: only what differs from the cache is read.
    assert stats.prefill_tokens == turn_length(session.tokenizer, "user", "Hello.") + 1 - 1
    assert len(session.messages) == 3
    assert_cache_is_a_fresh_prefill(session)


def test_a_new_system_prompt_keeps_the_exchanges_and_rereads_them_after_it(loaded) -> None:
    session = new_session(loaded)
    say(session, "Who holds the lamp?")
    exchange = session.turns
    session.set_system("You are a watchman.")
    assert session.messages[0] == Message("system", "You are a watchman.") and session.turns[1:] == exchange
    _, stats, _ = say(session, "And the ladder?")
    tokenizer = session.tokenizer
    reread = (turn_length(tokenizer, "system", "You are a watchman.") + sum(len(turn.ids) for turn in exchange)
              + turn_length(tokenizer, "user", "And the ladder?") + 1)
    assert stats.prefill_tokens == reread  # everything after <|endoftext|>
    assert_cache_is_a_fresh_prefill(session)
    session.set_system(None)
    assert session.system is None and session.messages[0].role == "user"
    say(session, "Goodbye.")
    assert_cache_is_a_fresh_prefill(session)


def test_a_system_prompt_too_long_for_the_context_is_refused(loaded) -> None:
    with pytest.raises(InputError, match=r"system prompt is .* tokens"):
        new_session(loaded, system="the watchman holds the lamp " * 40)


def test_a_message_too_long_for_the_context_is_refused_and_changes_nothing(loaded) -> None:
    session = new_session(loaded)
    say(session, "Hello.")
    before = session.ids
    with pytest.raises(InputError, match="shorten it"):
        say(session, "the watchman holds the lamp " * 40)
    assert session.ids == before and len(session.messages) == 2


# When the context fills ----------------------------------------------------------------------------


def test_a_full_context_drops_the_oldest_exchanges_keeps_the_system_prompt_and_says_so(loaded) -> None:
    session = new_session(loaded, system="Be terse.", max_new_tokens=8)
    question = "Who holds the lamp by the wall, and who the ladder?"
    dropped: list[ContextTrimmed] = []
    for _ in range(6):
        dropped += say(session, question)[2]
        assert len(session.ids) <= CONTEXT
    assert dropped and all(item.dropped_messages % 2 == 0 and item.context_length == CONTEXT for item in dropped)
    messages = session.messages
    assert messages[0] == Message("system", "Be terse.")
    assert len(messages) == 1 + 2 * 6 - sum(item.dropped_messages for item in dropped)
    assert [message.role for message in messages[1:]] == ["user", "assistant"] * ((len(messages) - 1) // 2)
    assert_cache_is_a_fresh_prefill(session)


def test_a_reply_that_fills_the_context_drops_old_exchanges_and_goes_on(loaded, scripted) -> None:
    session = new_session(loaded)
    tokenizer = session.tokenizer
    end = chat_token_ids(tokenizer).end
    scripted([*word_ids(tokenizer, 3), end])
    say(session, "Hello.")
    first = len(session.ids)
    prompt = turn_length(tokenizer, "user", "Speak at length.") + 1
    # Room for the prompt and a quarter of the context, so nothing is dropped before the reply; a reply
    # longer than what is left, but that fits, with its end, once the first exchange is gone.
    assert first + prompt + CONTEXT // 4 <= CONTEXT
    session.max_new_tokens = CONTEXT - prompt - 2
    scripted(word_ids(tokenizer, 100))  # never ends
    _, stats, trimmed = say(session, "Speak at length.")
    assert [item.dropped_messages for item in trimmed] == [2] and stats.dropped_messages == 2
    assert stats.stop == "length" and stats.decoded_tokens == session.max_new_tokens
    assert [message.content for message in session.messages if message.role == "user"] == ["Speak at length."]
    assert_cache_is_a_fresh_prefill(session)
    # Alone in the context with nothing left to drop, a reply stops at its end.
    session.max_new_tokens = 200
    _, stats, trimmed = say(session, "More.")
    assert [item.dropped_messages for item in trimmed] == [2]  # the long exchange, before this turn
    assert stats.stop == "context" and session.cached_tokens == CONTEXT
    session.max_new_tokens = 5
    say(session, "Enough.")  # the cut reply was closed, and is dropped in turn
    assert_cache_is_a_fresh_prefill(session)


def test_the_record_is_a_messages_record_training_takes(loaded, scripted) -> None:
    session = new_session(loaded, system="Be terse.")
    words = word_ids(session.tokenizer, 4)
    scripted([*words, chat_token_ids(session.tokenizer).end])
    say(session, "Who holds the lamp?")
    say(session, "Ünïcödé 🕯️?")
    reply = session.tokenizer.decode(words)
    assert session.record() == {"messages": [
        {"role": "system", "content": "Be terse."}, {"role": "user", "content": "Who holds the lamp?"},
        {"role": "assistant", "content": reply}, {"role": "user", "content": "Ünïcödé 🕯️?"},
        {"role": "assistant", "content": reply}]}
    assert conversation_problem(session.record()["messages"]) is None


# A base run ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory, sample_tokenizer: Tokenizer) -> Path:
    config = ModelConfig(vocab_size=sample_tokenizer.vocab_size, context_length=32, n_layer=1, n_head=2, d_model=16)
    return write_run(tmp_path_factory.mktemp("base") / "run", sample_tokenizer, config)


def test_a_base_run_is_refused_with_the_fix(base_run: Path, chat_run: Path) -> None:
    with pytest.raises(InputError, match=r"base model.*lm train CONVERSATIONS\.jsonl --init-from"):
        chat_format_of(base_run)
    assert chat_format_of(chat_run) == ChatFormat()


# `lm chat` over a pipe ------------------------------------------------------------------------------


def lm_chat(*args: str | Path, input: str) -> tuple[int, str, str]:
    """`lm chat ARGS` in this process, standard input from `input` (not a terminal): exit code, out, err."""
    with CliRunner().isolation(input=input, env={"COLUMNS": "120"}) as (out, err, _):
        try:
            main(["chat", *map(str, args)])
            code = 0
        except SystemExit as exit:
            code = exit.code
        sys.stdout.flush()  # the isolation's text wrappers buffer what reaches `out` and `err`
        sys.stderr.flush()
        return code, out.getvalue().decode(), err.getvalue().decode()


def prefills(stderr: str) -> list[int]:
    return [int(count) for count in re.findall(r"prefill (\d+) tokens", stderr)]


def test_lm_chat_over_a_pipe_keeps_one_cache_across_turns(chat_run: Path, loaded) -> None:
    tokenizer = loaded[1]
    code, out, err = lm_chat(chat_run, "--stats", "-t", "0", "-n", "10", "--device", "cpu",
                             input="Who holds the lamp?\n\nAnd the ladder?\n")
    assert code == 0, err
    first = 1 + turn_length(tokenizer, "user", "Who holds the lamp?") + 1
    assert prefills(err) == [first, turn_length(tokenizer, "user", "And the ladder?") + 1]
    assert err.count("tokens/s") == 2 and "seed " in err and out.endswith("\n")
    session = new_session(loaded, max_new_tokens=10)  # the same replies, greedy
    assert out == say(session, "Who holds the lamp?")[0] + "\n" + say(session, "And the ladder?")[0] + "\n"


def test_lm_chat_commands_over_a_pipe(chat_run: Path, loaded, scripted, tmp_path: Path) -> None:
    tokenizer = loaded[1]
    scripted([*word_ids(tokenizer, 4), chat_token_ids(tokenizer).end])
    saved, after_reset = tmp_path / "saved" / "chat.jsonl", tmp_path / "reset.jsonl"
    lines = ["/system Be terse.", "Who holds the lamp?", f"/save {saved}", "/reset", "Hello.", f"/save {after_reset}",
             "/system", "Goodbye.", "/quit", "never read"]
    code, out, err = lm_chat(chat_run, "--stats", "--seed", "3", input="\n".join(lines) + "\n")
    assert code == 0, err
    reply = tokenizer.decode(word_ids(tokenizer, 4))
    assert out == f"{reply}\n" * 3  # three turns; nothing after /quit
    record = json.loads(saved.read_text(encoding="utf-8"))
    assert record == {"messages": [{"role": "system", "content": "Be terse."},
                                   {"role": "user", "content": "Who holds the lamp?"},
                                   {"role": "assistant", "content": reply}]}
    assert conversation_problem(record["messages"]) is None  # a record training takes
    assert [m["content"] for m in json.loads(after_reset.read_text(encoding="utf-8"))["messages"]] == [
        "Be terse.", "Hello.", reply]
    assert "saved 3 messages to" in err and "seed 3" in err
    # After /reset the start, the system prompt and the <|user|> after them stayed cached; after /system
    # (removed) everything after the start is read again: "Hello.", its reply (4 words) and "Goodbye.".
    hello = turn_length(tokenizer, "user", "Hello.")
    assert prefills(err)[1] == hello + 1 - 1
    assert prefills(err)[2] == hello + (1 + 4 + 1) + turn_length(tokenizer, "user", "Goodbye.") + 1


def test_lm_chat_says_when_the_context_is_full(chat_run: Path) -> None:
    question = "Who holds the lamp by the wall, and who the ladder?"
    code, _, err = lm_chat(chat_run, "-t", "0", "-n", "8", "--system", "Be terse.", input=f"{question}\n" * 6)
    assert code == 0, err
    notices = [line for line in err.splitlines() if "is full" in line]
    assert notices and notices[0].startswith(f"the context ({CONTEXT} tokens) is full: dropped the oldest 2 messages")
    assert "(the system prompt stays)" in notices[0]


def test_lm_chat_refuses_a_base_run_in_one_line(base_run: Path) -> None:
    code, out, err = lm_chat(base_run, input="Hello.\n")
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    assert f"lm train CONVERSATIONS.jsonl --init-from {base_run}" in err


def test_lm_chat_errors_over_a_pipe_end_the_run_in_one_line(chat_run: Path, loaded, scripted) -> None:
    words = word_ids(loaded[1], 2)
    scripted(words)
    code, out, err = lm_chat(chat_run, "-n", "2", input="Hello.\n/unknown\nNever.\n")
    assert code == 2 and out == loaded[1].decode(words) + "\n"
    assert err.startswith("error: unknown command /unknown") and err.count("\n") == 1
    code, _, err = lm_chat(chat_run, "--top-p", "0", input="Hello.\n")
    assert code == 2 and err.startswith("error: --top-p")


def test_lm_chat_in_a_terminal_reports_a_problem_and_goes_on(chat_run: Path, loaded, scripted,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import lm.cli.chat

    typed = iter(["Hello.", "/save", "/nonsense", "How fares the night?"])

    def fake_input(prompt: str = "") -> str:
        line = next(typed, None)
        if line is None:
            raise EOFError  # Ctrl-D
        return line

    monkeypatch.setattr(lm.cli.chat, "_stdin_is_a_terminal", lambda: True)
    monkeypatch.setattr("builtins.input", fake_input)
    words = word_ids(loaded[1], 3)
    scripted([*words, chat_token_ids(loaded[1]).end])
    code, out, err = lm_chat(chat_run, input="")
    assert code == 0, err
    assert out == f"{loaded[1].decode(words)}\n" * 2 + "\n"  # two replies, then Ctrl-D's new line
    lines = err.splitlines()
    assert "/reset, /system TEXT, /save FILE, /quit" in lines[0]  # what can be typed, said once at the start
    assert lines[1:] == ["error: /save needs a file: /save FILE",
                         "error: unknown command /nonsense; the commands are /reset, /system TEXT, /save FILE, /quit"]
