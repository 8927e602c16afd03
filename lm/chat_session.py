"""A conversation with a chat model that keeps one KV cache across turns.

Rendering turn by turn gives the ids rendering at once gives (lm/chat.py), so the cache a reply
leaves behind is the prefix of the next turn's prompt: a new turn prefills only its own tokens (the
user's turn and the assistant marker that asks for the reply), then decodes the reply one token at a
time, streaming whole UTF-8 characters. The reply stops at the end-of-turn token (or at
<|endoftext|>, which a model may give in its place) or after `max_new_tokens`; the turn is then closed
with the end-of-turn token, which goes through the model into the cache like every other token, so the
cache holds exactly `ChatSession.ids`: the conversation as `render` would give it, the replies spelled
as they were sampled.

Keeping the cache
-----------------
The session keeps the ids its cache holds beside it. Before each turn it compares them with the
conversation's ids: the cache is cut back to the longest prefix they share (its length is the
position the next write goes to, so nothing is copied) and only the rest is prefilled. A plain
turn shares everything and prefills only its own tokens; after `/system` the conversation differs
right after the start token and everything from there is read again; after `reset` the conversation
is its start (and system prompt) and so is what the cache keeps.

When the context fills
----------------------
Before a turn, the oldest whole exchanges (a user turn and its reply) are dropped until the new turn
and room for its reply fit (the room: `max_new_tokens` + 1, at most a quarter of the context); the
system prompt always stays. Dropping changes every later position, so the cache is rebuilt from the
start token onwards (one prefill of what is kept). A reply that still reaches the end of the context
drops exchanges again and goes on; when only the current exchange is left it stops there
(`stop == "context"`). Each drop is reported by a `ContextTrimmed` item in the reply's stream.

Nothing here prints: `reply` yields text pieces and `ContextTrimmed` notices, and fills a `TurnStats`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lm.chat import (
    ASSISTANT,
    CHAT_FORMAT_FILE,
    DEFAULT_CHAT_FORMAT,
    MESSAGES_FIELD,
    SYSTEM,
    USER,
    ChatFormat,
    Message,
    chat_token_ids,
    conversation_start,
    generation_prompt,
    load_chat_format,
    render_turn,
)
from lm.errors import InputError, UsageError
from lm.generate import random_seed, token_step
from lm.model import GPT, KVCache
from lm.rundir import is_run
from lm.sampling import SamplingConfig, sample_next
from lm.tokenizer import Tokenizer, TokenTextDecoder


def chat_format_of(run_dir: Path) -> ChatFormat:
    """The chat format of a chat run; `InputError` naming the fix for a base run.

    A folder that is not a run at all is left for `load_run` to explain (this returns the default then).
    """
    run_dir = Path(run_dir)
    chat_format = load_chat_format(run_dir)
    if chat_format is not None or not is_run(run_dir):
        return chat_format or DEFAULT_CHAT_FORMAT
    raise InputError(f"{run_dir} is a base model, not a chat model (it has no {CHAT_FORMAT_FILE}); fine-tune it on "
                     f"conversations first: `lm train CONVERSATIONS.jsonl --init-from {run_dir} --out CHAT_RUN`, "
                     "then `lm chat CHAT_RUN`")


@dataclass(frozen=True)
class Turn:
    """One message and its ids as the cache holds them: role marker, content, end-of-turn token.

    A reply's content ids are the ones sampled, which may spell its text differently from how the
    tokenizer would encode it; the cache keeps what the model read.
    """

    message: Message
    ids: tuple[int, ...]


@dataclass(frozen=True)
class ContextTrimmed:
    """The context was full: the oldest exchanges were dropped and the cache rebuilt from what was kept."""

    dropped_messages: int  # user turns and replies, the oldest first; the system prompt is never dropped
    context_length: int


@dataclass
class TurnStats:
    """What one turn cost, filled in while its reply streams; complete when the stream ends."""

    prefill_tokens: int = 0  # ids read in prefill passes: the new turn's own, more after /system or a drop
    prefill_s: float = 0.0
    decoded_tokens: int = 0  # tokens sampled for the reply, its end-of-turn token included
    decode_s: float = 0.0  # sampling and one-token steps, closing the turn in the cache included
    dropped_messages: int = 0  # dropped from the start of the conversation to fit the context
    context_tokens: int = 0  # ids in the cache when the turn is done
    # "end" (end of turn), "length" (max_new_tokens), "context" (no room left), "stopped" (the caller left)
    stop: str = ""

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decoded_tokens / self.decode_s if self.decoded_tokens and self.decode_s > 0 else 0.0


@dataclass
class _Reply:
    """The reply being sampled: its content ids and text so far."""

    ids: list[int] = field(default_factory=list)
    text: str = ""


class ChatSession:
    """A conversation with `model`: `reply` to each user message, `reset`, `set_system`, `record`.

    The model should be ready for generation (`lm.generate.prepare_for_generation`). One session
    samples with one generator, seeded once: the same seed and the same messages give the same replies.
    """

    def __init__(self, model: GPT, tokenizer: Tokenizer, chat_format: ChatFormat = DEFAULT_CHAT_FORMAT, *,
                 sampling: SamplingConfig | None = None, max_new_tokens: int = 200, system: str | None = None,
                 seed: int | None = None) -> None:
        if max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
        self.model = model
        self.tokenizer = tokenizer
        self.chat_format = chat_format
        self.sampling = (sampling or SamplingConfig()).validate()
        self.max_new_tokens = max_new_tokens
        self.token_ids = chat_token_ids(tokenizer, chat_format)  # InputError for a base model's tokenizer
        self.context_length = model.config.context_length
        param = next(model.parameters())
        self.device = param.device
        with torch.inference_mode():  # written only in inference mode, by `reply`
            self.cache = KVCache(model.config, 1, param.device, param.dtype)
        self.step = token_step(model)
        self.seed = seed if seed is not None else random_seed()
        self.generator = torch.Generator(device=param.device).manual_seed(self.seed)
        self._start = tuple(conversation_start(tokenizer, chat_format).ids)
        self._ask = tuple(generation_prompt(tokenizer, chat_format).ids)
        self._stops = {self.token_ids.end, *([tokenizer.eot_id] if tokenizer.eot_id is not None else [])}
        self._system: Turn | None = None
        self._exchanges: list[tuple[Turn, Turn]] = []  # user turn, reply
        self._cached: list[int] = []  # the ids the cache holds, in order (cache.length of them)
        self.set_system(system)

    # The conversation ------------------------------------------------------------------------------

    @property
    def turns(self) -> list[Turn]:
        """The conversation: the system prompt (if any), then each user turn and its reply."""
        head = [self._system] if self._system else []
        return head + [turn for exchange in self._exchanges for turn in exchange]

    @property
    def messages(self) -> list[Message]:
        return [turn.message for turn in self.turns]

    @property
    def ids(self) -> list[int]:
        """The conversation's ids, which the cache holds once a turn is done."""
        return self._ids_with()

    @property
    def cached_tokens(self) -> int:
        return len(self._cached)

    @property
    def system(self) -> str | None:
        return self._system.message.content if self._system else None

    def record(self) -> dict[str, list[dict[str, str]]]:
        """The conversation as a messages record, as training data and `lm serve` take it."""
        return {MESSAGES_FIELD: [message.to_dict() for message in self.messages]}

    def reset(self) -> None:
        """Forget every exchange; the system prompt stays. The cache keeps what is still shared."""
        self._exchanges.clear()

    def set_system(self, text: str | None) -> None:
        """Replace the system prompt (None or blank: none); the exchanges stay, read after it again."""
        if text is None or not text.strip():
            self._system = None
            return
        turn = self._turn(Message(SYSTEM, text))
        if len(self._start) + len(turn.ids) > self.context_length // 2:
            raise InputError(f"the system prompt is {len(turn.ids):,} tokens, which leaves less than half of the "
                             f"model's context of {self.context_length:,} tokens for the conversation; shorten it")
        self._system = turn

    # A turn ----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def reply(self, text: str, stats: TurnStats | None = None) -> Iterator[str | ContextTrimmed]:
        """Add the user's `text` and stream the model's reply: text pieces (whole characters), and a
        `ContextTrimmed` wherever the oldest exchanges had to be dropped.

        The exchange joins the conversation once the prompt is read; a reply left before its end (the
        caller stops iterating) is kept as far as it got.
        """
        stats = stats if stats is not None else TurnStats()
        if not text.strip():
            raise InputError("the message is empty; type some text")
        user = self._turn(Message(USER, text))
        prompt = [*user.ids, *self._ask]
        fixed = len(self._start) + (len(self._system.ids) if self._system else 0)
        if fixed + len(prompt) >= self.context_length:
            raise InputError(f"the message is {len(user.ids):,} tokens; with the system prompt it leaves no room "
                             f"for a reply in the model's context of {self.context_length:,} tokens; shorten it")
        room = min(self.max_new_tokens + 1, max(1, self.context_length // 4))
        if trimmed := self._drop_oldest(len(prompt) + room, stats):
            yield trimmed
        logits = self._prefill(self._ids_with(prompt), stats)
        yield from self._sample_reply(user, logits, stats)

    def _sample_reply(self, user: Turn, logits: torch.Tensor, stats: TurnStats) -> Iterator[str | ContextTrimmed]:
        reply, text, seen = _Reply(), TokenTextDecoder(self.tokenizer), self._seen()
        stop = ""
        try:
            for _ in range(self.max_new_tokens):
                started, prefill_s = time.perf_counter(), stats.prefill_s
                token = int(sample_next(logits, self.sampling, self.generator, seen).item())
                stats.decoded_tokens += 1
                if token in self._stops:
                    stop = "end"
                    stats.decode_s += time.perf_counter() - started
                    break
                reply.ids.append(token)
                if seen is not None:
                    seen[0, token] = True
                piece, trimmed = text.push(token), None
                if len(self._cached) < self.context_length:
                    logits = self._feed(token)
                elif trimmed := self._make_room(user, reply, stats):  # the context is full: make room
                    logits = self._prefill(self._ids_with([*user.ids, *self._ask, *reply.ids]), stats)
                else:
                    stop = "context"
                # A rebuild's prefill is counted as prefill.
                stats.decode_s += time.perf_counter() - started - (stats.prefill_s - prefill_s)
                reply.text += piece
                if piece:
                    yield piece
                if trimmed:
                    yield trimmed
                if stop:
                    break
            else:
                stop = "length"
            if piece := text.finish():
                reply.text += piece
                yield piece
        finally:
            stats.stop = stop or "stopped"  # "stopped": the caller left before the reply ended
            started = time.perf_counter()
            if self._close_turn(user, reply):
                stats.decode_s += _seconds_since(started, self.cache.keys)
            stats.context_tokens = len(self._cached)

    def _close_turn(self, user: Turn, reply: _Reply) -> bool:
        """Add the exchange to the conversation and, when it fits and the cache holds the reply so far,
        its end-of-turn token to the cache (else the next turn's prefill reads it). Whether it did."""
        ids = (self.token_ids.markers[ASSISTANT], *reply.ids, self.token_ids.end)
        self._exchanges.append((user, Turn(Message(ASSISTANT, reply.text), ids)))
        before_end = self._ids_with()[:-1]
        if len(before_end) >= self.context_length or before_end != self._cached:
            return False
        self._feed(self.token_ids.end)
        return True

    # The cache -------------------------------------------------------------------------------------

    def _ids_with(self, pending: Sequence[int] = ()) -> list[int]:
        """The conversation's ids followed by `pending` (the current turn's, not yet in the conversation)."""
        return [*self._start, *(id for turn in self.turns for id in turn.ids), *pending]

    def _prefill(self, ids: list[int], stats: TurnStats) -> torch.Tensor:
        """Make the cache hold `ids`, reading only what it does not share with them; the last one's logits.

        The last id is always read (its logits are what is asked for), even when the cache held it.
        """
        shared = 0
        for cached, wanted in zip(self._cached, ids[:-1], strict=False):
            if cached != wanted:
                break
            shared += 1
        del self._cached[shared:]
        self.cache.length = shared
        new = ids[shared:]
        started = time.perf_counter()
        batch = torch.tensor([new], dtype=torch.long, device=self.device)
        logits = self.model(batch, cache=self.cache, logits_from=len(new) - 1)[0][:, -1]
        self._cached += new
        stats.prefill_tokens += len(new)
        stats.prefill_s += _seconds_since(started, logits)
        return logits

    def _feed(self, token: int) -> torch.Tensor:
        """One token into the cache; the logits for the next."""
        logits = self.step.run(torch.tensor([[token]], dtype=torch.long, device=self.device), self.cache)
        self._cached.append(token)
        return logits

    def _drop_oldest(self, needed: int, stats: TurnStats) -> ContextTrimmed | None:
        """Drop the oldest exchanges until the conversation and `needed` more ids fit in the context
        (or none is left); what was dropped, if anything."""
        dropped = 0
        while self._exchanges and len(self._ids_with()) + needed > self.context_length:
            del self._exchanges[0]
            dropped += 2
        if not dropped:
            return None
        stats.dropped_messages += dropped
        return ContextTrimmed(dropped, self.context_length)

    def _make_room(self, user: Turn, reply: _Reply, stats: TurnStats) -> ContextTrimmed | None:
        """Mid-reply, with the context full: drop old exchanges to leave room for the rest of the reply."""
        left = self.max_new_tokens - len(reply.ids) + 1
        current = [*user.ids, *self._ask, *reply.ids]
        return self._drop_oldest(len(current) + min(left, max(1, self.context_length // 4)), stats)

    def _seen(self) -> torch.Tensor | None:
        """For the repetition penalty: the content tokens in the context (never the chat's own tokens,
        which every turn repeats and the end of a reply needs)."""
        if self.sampling.repetition_penalty == 1.0:
            return None
        seen = torch.zeros(1, self.model.config.vocab_size, dtype=torch.bool, device=self.device)
        seen[0, torch.tensor(self._cached, dtype=torch.long, device=self.device)] = True
        specials = [*self.token_ids.markers.values(), *self._stops, *self._start]
        seen[0, torch.tensor(specials, dtype=torch.long, device=self.device)] = False
        return seen

    def _turn(self, message: Message) -> Turn:
        return Turn(message, tuple(render_turn(message, self.tokenizer, self.chat_format).ids))


def _seconds_since(started: float, result: torch.Tensor) -> float:
    if result.device.type == "cuda":
        torch.cuda.synchronize(result.device)  # kernels run asynchronously: wait before reading the clock
    return time.perf_counter() - started
