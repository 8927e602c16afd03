"""Conversations: messages rendered to token ids and a loss mask, by the one renderer every consumer uses.

Training on conversations, `lm chat`, `lm serve` and the exports all turn messages into ids here, so
a model is asked for a reply in exactly the form it learned to give one.

The format
----------
A conversation is a list of messages `{"role": "system" | "user" | "assistant", "content": "..."}`
(OpenAI's and TRL's shape). Each message is rendered as its role marker, its content encoded as plain
text, and the end-of-turn token; the conversation starts after `<|endoftext|>`, as every document
`lm` trains on does:

    <|endoftext|> <|system|> You are terse. <|end|> <|user|> Hi! <|end|> <|assistant|> Hello. <|end|>

`<|system|>`, `<|user|>`, `<|assistant|>` and `<|end|>` are special tokens, one id each, inserted
by id: content is encoded with special-token strings as text, so a user who types "<|end|>" gets the
characters, not the control token. No text (no newline, no role name) is added around the content,
so each content is encoded on its own, exactly as `Tokenizer.encode(content)` encodes it, and the
Jinja template below can reproduce the ids through other tokenizers. `ChatFormat` names the tokens;
its `to_dict`/`from_dict` are what a run directory records.

The mask
--------
`RenderedConversation.mask` is aligned with `ids`: `mask[i]` is True when `ids[i]` is a token the
model learns to produce, i.e. a target predicted from `ids[:i]`. It is True exactly for the
assistant's content tokens and the assistant's `<|end|>`: never for system or user tokens, never
for a role marker (the prompt gives `<|assistant|>`; the model only has to answer after it), never
for `<|endoftext|>`. `mask[0]` is therefore always False. For next-token loss, shift both the same
way as the ids: `inputs = ids[:-1]`, `targets = ids[1:]`, `target_mask = mask[1:]` (the properties
of the same names).

Rendering turn by turn
----------------------
`render(messages)` is `conversation_start` followed by `render_turn` of each message, and
`add_generation_prompt=True` appends `<|assistant|>`. So a chat session can prefill
`render(history, add_generation_prompt=True)`, sample the reply up to `<|end|>` into its KV cache,
and continue with `render_turn(next_user_message) + generation_prompt` alone: the cache then holds
what `render` of the whole conversation gives (when the reply's sampled ids are the ones its text
encodes to; a model can sample a non-canonical spelling, which the session keeps as sampled).

Records and their problems
--------------------------
`read_conversations` reads `messages` records from JSON Lines (`.jsonl`, `.jsonl.gz`) and Parquet (a
`messages` column of role/content structs) through `lm.textfiles`, so folders, globs and held-out
cuts work as for text. A record is bad when `conversation_problem` says so: an unknown role, roles
out of order (an optional leading system message, then user and assistant alternating, starting with
user and, for training, ending with assistant), empty or non-string content, or no assistant turn.
Bad records are counted in a `RecordProblems` (the first with its file:line) and skipped.

Too long
--------
`cut_to_fit` cuts a conversation at turn boundaries: it keeps the leading system message and as many
whole user + assistant exchanges from the start as fit in `max_tokens`, and drops the conversation
(None) when the first exchange does not fit. `render_conversations` does it for a stream and counts
the conversations kept whole, cut and dropped in a `CutCounts`.

A tokenizer without the chat tokens
-----------------------------------
`add_chat_tokens` returns a new tokenizer with the missing tokens appended as the next ids (the
vocabulary grows by exactly those; every old id and every text's encoding stay as they were).
`grow_vocab` (a model) and `grow_vocab_weights` (a saved state dict) append the matching rows to the
token embedding and, when it is not tied to it, the output head. Each new row is the mean of the
existing rows: a new token's logit is then h·mean(W) = the mean of the old tokens' logits, an
ordinary value, so the first steps neither predict the new tokens with confidence nor pay a huge
loss for them, and as inputs they start at the centre of the embeddings the blocks have learned to
read (random rows of the init's scale would be far from every trained row). The rows start equal;
the different contexts and targets each token meets separate them.

Who calls what
--------------
- training: `read_conversations(files, problems)` -> `render_conversations(..., max_tokens=T + 1, counts)`
  -> each `RenderedConversation`'s `inputs`, `targets`, `target_mask`; `--init-from` a base run:
  `add_chat_tokens(tokenizer)`, then `grow_vocab_weights(weights, new_tokenizer.vocab_size)` (or
  `grow_vocab(model, ...)`); the run records `ChatFormat.to_dict()`.
- `lm chat`: `has_chat_tokens` to refuse a base run; `render(history, add_generation_prompt=True)`
  to prefill, `chat_token_ids(tokenizer).end` to stop, `render_turn` + `generation_prompt` per turn,
  `cut_to_fit` when the context fills.
- `lm serve`: `conversation_problem(messages, for_training=False)` for a 400, then `render`.
- exports: `jinja_chat_template(format)`; the end-of-turn id is the stop token to declare.

The template travels
--------------------
`jinja_chat_template` writes the format as a Jinja `chat_template`. transformers'
`apply_chat_template(messages, tokenize=True, add_generation_prompt=...)` with lm's exported
tokenizer renders it to exactly `render`'s ids, because transformers splits the rendered text at the
special tokens and encodes each content on its own. One difference: transformers re-reads special-
token strings inside content as control tokens (a user's "<|end|>" becomes the end-of-turn token)
unless `sanitize_control_tokens=True` is passed (an option of recent transformers, 5.25 in the
tests), with which it matched lm on the contents tested but not on every one (whitespace before a
marker string differs); lm always keeps them as text. Content that spells no special token renders
to the same ids either way (a property test). The template
starts with `<|endoftext|>`; llama.cpp, whose GGUF from lm asks it to add that token as BOS itself,
removes a BOS the template writes rather than doubling it (llama.cpp pull request 15086; not tested
here).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tokenizers import Tokenizer as HFTokenizer
from torch import nn

from lm.errors import InputError, UsageError
from lm.textfiles import RecordProblems, TextFiles, TextPart, iter_record_values
from lm.tokenizer import END_OF_TEXT, Tokenizer

if TYPE_CHECKING:
    from lm.model import GPT

SYSTEM, USER, ASSISTANT = "system", "user", "assistant"
ROLES = (SYSTEM, USER, ASSISTANT)
MESSAGES_FIELD = "messages"
# Weights, in a saved state dict, that have one row per token id (the head only when untied).
VOCAB_ROWS = ("tok_emb.weight", "lm_head.weight")


@dataclass(frozen=True)
class Message:
    """One turn of a conversation: who speaks (`ROLES`) and what they say."""

    role: str
    content: str

    def to_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


Conversation = tuple[Message, ...]
MessageLike = Message | Mapping[str, Any]  # a Message, or a {"role", "content"} dict as JSON gives it


@dataclass(frozen=True)
class ChatFormat:
    """The special tokens a conversation is rendered with (see the module docstring).

    `begin` is the token a conversation starts after (None: none); `end` closes every turn and is
    where a reply stops.
    """

    system: str = "<|system|>"
    user: str = "<|user|>"
    assistant: str = "<|assistant|>"
    end: str = "<|end|>"
    begin: str | None = END_OF_TEXT

    def __post_init__(self) -> None:
        named = [token for token in (self.system, self.user, self.assistant, self.end, self.begin)
                 if token is not None]
        for token in named:
            if not isinstance(token, str) or not token or token != token.strip():
                raise UsageError(f"chat token {token!r} must be a non-empty string without surrounding whitespace")
            if "{" in token or "}" in token:  # they are written into a Jinja template as they are
                raise UsageError(f"chat token {token!r} holds a brace, which Jinja would read as syntax")
        if len(set(named)) != len(named):
            raise UsageError(f"chat tokens {named} must all differ")

    @property
    def markers(self) -> dict[str, str]:
        """The token that opens each role's turn."""
        return {SYSTEM: self.system, USER: self.user, ASSISTANT: self.assistant}

    @property
    def tokens(self) -> tuple[str, ...]:
        """Every special token the format needs a tokenizer to have, in the order they would be added."""
        return (*((self.begin,) if self.begin is not None else ()), self.system, self.user, self.assistant, self.end)

    def to_dict(self) -> dict[str, str | None]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "the chat format") -> ChatFormat:
        """The format `to_dict` wrote; raises `InputError` naming what is wrong with a damaged one."""
        names = {item.name for item in dataclasses.fields(cls)}
        if not isinstance(data, Mapping) or set(data) - names:
            raise InputError(f"{source} is not a chat format (expected keys {sorted(names)}); "
                             "the run directory is damaged")
        try:
            return cls(**data)
        except (UsageError, TypeError) as err:
            raise InputError(f"{source} is not a usable chat format ({err}); the run directory is damaged") from None


DEFAULT_CHAT_FORMAT = ChatFormat()


@dataclass(frozen=True)
class ChatTokenIds:
    """A format's tokens as one tokenizer's ids."""

    markers: Mapping[str, int]  # role -> id of its marker
    end: int
    begin: int | None


def chat_token_ids(tokenizer: Tokenizer, chat_format: ChatFormat = DEFAULT_CHAT_FORMAT) -> ChatTokenIds:
    """The ids of the format's tokens; `InputError` when the tokenizer lacks any (a base model's)."""
    missing = [token for token in chat_format.tokens if token not in tokenizer.special_tokens]
    if missing:
        raise InputError(f"the tokenizer has no chat token {', '.join(missing)}: it is a base (non-chat) model's; "
                         "fine-tune it on conversations (messages records) first, which adds them")
    ids = tokenizer.special_tokens
    return ChatTokenIds(markers={role: ids[token] for role, token in chat_format.markers.items()},
                        end=ids[chat_format.end],
                        begin=ids[chat_format.begin] if chat_format.begin is not None else None)


def has_chat_tokens(tokenizer: Tokenizer, chat_format: ChatFormat = DEFAULT_CHAT_FORMAT) -> bool:
    """Whether `tokenizer` has every special token of the format (a chat model's tokenizer does)."""
    return all(token in tokenizer.special_tokens for token in chat_format.tokens)


# Rendering -----------------------------------------------------------------------------------------


@dataclass
class RenderedConversation:
    """Token ids and, aligned with them, which ones are targets the model learns (see the module docstring)."""

    ids: list[int]
    mask: list[bool]

    def __len__(self) -> int:
        return len(self.ids)

    def __add__(self, other: RenderedConversation) -> RenderedConversation:
        return RenderedConversation(self.ids + other.ids, self.mask + other.mask)

    def extend(self, other: RenderedConversation) -> None:
        self.ids.extend(other.ids)
        self.mask.extend(other.mask)

    @property
    def inputs(self) -> list[int]:
        """What the model reads for next-token loss: every id but the last."""
        return self.ids[:-1]

    @property
    def targets(self) -> list[int]:
        """What it is asked to predict at each input position: the next id."""
        return self.ids[1:]

    @property
    def target_mask(self) -> list[bool]:
        """Whether each target counts in the loss (assistant content and its end-of-turn token)."""
        return self.mask[1:]

    @property
    def learned(self) -> int:
        """How many ids are targets the model learns."""
        return sum(self.mask)


def render(messages: Sequence[MessageLike], tokenizer: Tokenizer, *, add_generation_prompt: bool = False,
           chat_format: ChatFormat = DEFAULT_CHAT_FORMAT) -> RenderedConversation:
    """`messages` as ids and target mask: the start token, each turn, and with `add_generation_prompt`
    the assistant marker that asks for a reply.

    The order of roles is not checked here (`conversation_problem` does that); an unknown role or
    content that is not a string raises `InputError`, a tokenizer without the chat tokens too.
    """
    token_ids = chat_token_ids(tokenizer, chat_format)
    rendered = _start(token_ids)
    for message in messages:
        rendered.extend(_render_turn(_message(message), tokenizer, token_ids))
    if add_generation_prompt:
        rendered.extend(_generation_prompt(token_ids))
    return rendered


def render_turn(message: MessageLike, tokenizer: Tokenizer,
                chat_format: ChatFormat = DEFAULT_CHAT_FORMAT) -> RenderedConversation:
    """One message: role marker, content, end-of-turn; content and end are targets for the assistant only."""
    return _render_turn(_message(message), tokenizer, chat_token_ids(tokenizer, chat_format))


def conversation_start(tokenizer: Tokenizer, chat_format: ChatFormat = DEFAULT_CHAT_FORMAT) -> RenderedConversation:
    """What every conversation starts with (`<|endoftext|>`), before its first turn."""
    return _start(chat_token_ids(tokenizer, chat_format))


def generation_prompt(tokenizer: Tokenizer, chat_format: ChatFormat = DEFAULT_CHAT_FORMAT) -> RenderedConversation:
    """The assistant marker a prompt ends with to ask for a reply (not a target: the prompt gives it)."""
    return _generation_prompt(chat_token_ids(tokenizer, chat_format))


def _start(token_ids: ChatTokenIds) -> RenderedConversation:
    if token_ids.begin is None:
        return RenderedConversation([], [])
    return RenderedConversation([token_ids.begin], [False])


def _generation_prompt(token_ids: ChatTokenIds) -> RenderedConversation:
    return RenderedConversation([token_ids.markers[ASSISTANT]], [False])


def _render_turn(message: Message, tokenizer: Tokenizer, token_ids: ChatTokenIds) -> RenderedConversation:
    content = tokenizer.encode(message.content)  # special-token strings in it stay text
    learned = message.role == ASSISTANT
    return RenderedConversation([token_ids.markers[message.role], *content, token_ids.end],
                                [False, *([learned] * len(content)), learned])


def _message(message: MessageLike) -> Message:
    """A `Message` from a Message or a {"role", "content"} mapping; `InputError` for an unusable one."""
    if isinstance(message, Message):
        role, content = message.role, message.content
    elif isinstance(message, Mapping):
        role, content = message.get("role"), message.get("content")
    else:
        raise InputError(f"a message is {type(message).__name__}, not an object with role and content")
    if role not in ROLES:
        raise InputError(f"a message has role {role!r}; roles are {', '.join(ROLES)}")
    if not isinstance(content, str):
        raise InputError(f"a {role} message's content is {type(content).__name__}, not a string")
    return message if isinstance(message, Message) else Message(role, content)


# Validation and reading ---------------------------------------------------------------------------


def conversation_problem(messages: object, *, for_training: bool = True) -> str | None:
    """Why `messages` (a record's `messages` value, as JSON gave it) is not a usable conversation, or None.

    A usable one is a list of {"role", "content"} objects with non-empty string content: an optional
    system message first, then user and assistant turns alternating, starting with user. For
    training it must also end with an assistant turn (so it has one to learn from); a prompt
    (`for_training=False`, as `lm chat` and `lm serve` send) may end with either.
    """
    if not isinstance(messages, list):
        return f"{MESSAGES_FIELD!r} is {_json_type(messages)}, not a list of messages"
    if not messages:
        return f"{MESSAGES_FIELD!r} is empty"
    for number, message in enumerate(messages, start=1):
        problem = _message_problem(number, message) or _order_problem(number, message["role"], messages)
        if problem:
            return problem
    if for_training and not any(message["role"] == ASSISTANT for message in messages):
        return "no assistant turn to learn from"
    if for_training and messages[-1]["role"] != ASSISTANT:
        return f"ends with a {messages[-1]['role']} turn that has no assistant reply"
    return None


def parse_conversation(messages: object, *, for_training: bool = True) -> Conversation:
    """`messages` (as JSON gave it) as a `Conversation`; `InputError` saying what is wrong with a bad one."""
    problem = conversation_problem(messages, for_training=for_training)
    if problem:
        raise InputError(f"not a usable conversation: {problem}")
    assert isinstance(messages, list)
    return tuple(Message(message["role"], message["content"]) for message in messages)


def _message_problem(number: int, message: object) -> str | None:
    if not isinstance(message, dict):
        return f"message {number} is {_json_type(message)}, not an object with role and content"
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        return (f"message {number} has no role" if role is None
                else f"message {number} has role {role!r} (roles are {', '.join(ROLES)})")
    if not isinstance(content, str):
        return (f"message {number} ({role}) has no content" if content is None
                else f"message {number} ({role}) has content of type {_json_type(content)}, not a string")
    if not content.strip():
        return f"message {number} ({role}) has empty content"
    return None


def _order_problem(number: int, role: str, messages: list) -> str | None:
    """Whether message `number` (1-based) is out of the order system?, user, assistant, user, ..."""
    if role == SYSTEM:
        return None if number == 1 else f"message {number} is a system message; only the first message may be one"
    turn = number - (2 if messages[0]["role"] == SYSTEM else 1)  # 0 for the first user turn
    expected = USER if turn % 2 == 0 else ASSISTANT
    if role == expected:
        return None
    return (f"message {number} is {role} where {expected} was expected "
            "(after an optional system message, turns alternate user, assistant)")


def _json_type(value: object) -> str:
    names = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string",
             list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def read_conversations(sources: TextFiles | Sequence[Path | TextPart], problems: RecordProblems | None = None, *,
                       on_bytes: Callable[[int], None] | None = None,
                       field_name: str = MESSAGES_FIELD) -> Iterator[Conversation]:
    """The usable conversations in the `messages` records of JSON Lines and Parquet `sources`, in order.

    Bad records (not JSON, no such field, or a `conversation_problem`) are counted in `problems`,
    the first with its file:line, and skipped; good ones are counted as read. Raises `InputError` for
    a plain text part (before reading) and when records were read but none was usable.
    """
    problems = problems if problems is not None else RecordProblems()
    for where, value in iter_record_values(sources, field_name, problems, on_bytes):
        problem = conversation_problem(value)
        if problem:
            problems.add_bad(where, problem)
            continue
        problems.good += 1
        yield tuple(Message(message["role"], message["content"]) for message in value)
    if problems.bad and not problems.good:
        raise InputError(f"none of the {problems.bad:,} conversation records is usable (first: {problems.first}); "
                         f'records need "{field_name}": [{{"role": "user", "content": "..."}}, '
                         '{"role": "assistant", "content": "..."}]')


# Too long -----------------------------------------------------------------------------------------


def holds_conversations(sources: TextFiles, field_name: str = MESSAGES_FIELD) -> bool:
    """Whether `sources` are conversation records: the first record of the first JSON Lines or Parquet part
    has a `messages` field and no `text` one. Reads one record, however large the files."""
    import gzip
    import json

    from lm.textfiles import JSONL, JSONL_GZ, PARQUET, TEXT_FIELD

    part = next((p for p in sources.parts if p.format in (JSONL, JSONL_GZ, PARQUET)), None)
    if part is None:
        return False
    if part.format == PARQUET:
        import pyarrow.parquet as pq

        names = pq.ParquetFile(part.path).schema_arrow.names
        return field_name in names and TEXT_FIELD not in names
    opener = gzip.open if part.format == JSONL_GZ else open
    with opener(part.path, "rt", encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(record, dict) and field_name in record and TEXT_FIELD not in record
    return False


@dataclass
class CutCounts:
    """How the conversations of a stream fared against the length limit."""

    whole: int = 0  # fit as they were
    cut: int = 0  # lost exchanges from the end to fit
    dropped: int = 0  # left out: the first exchange alone did not fit

    @property
    def kept(self) -> int:
        return self.whole + self.cut


def cut_to_fit(messages: Sequence[MessageLike], tokenizer: Tokenizer, max_tokens: int,
               chat_format: ChatFormat = DEFAULT_CHAT_FORMAT) -> tuple[RenderedConversation | None, int]:
    """(the rendered conversation, how many of its messages were kept), in at most `max_tokens` ids.

    Cuts at turn boundaries: the leading system message stays, then whole exchanges (a user turn
    and the assistant's reply) from the start, as many as fit. (None, 0) when the first exchange
    does not fit with the system message. Training that reads `ids[:-1]` in a context of T passes
    `max_tokens = T + 1`.
    """
    if max_tokens < 1:
        raise UsageError(f"a conversation must be allowed at least one token, got max_tokens={max_tokens}")
    token_ids = chat_token_ids(tokenizer, chat_format)
    turns = [_message(message) for message in messages]
    rendered = _start(token_ids)
    head = 1 if turns and turns[0].role == SYSTEM else 0
    for message in turns[:head]:
        rendered.extend(_render_turn(message, tokenizer, token_ids))
    kept, exchange = head, RenderedConversation([], [])
    for index in range(head, len(turns)):
        exchange.extend(_render_turn(turns[index], tokenizer, token_ids))
        if turns[index].role == ASSISTANT or index == len(turns) - 1:  # an exchange ends with the reply
            if len(rendered) + len(exchange) > max_tokens:
                break
            rendered.extend(exchange)
            kept, exchange = index + 1, RenderedConversation([], [])
    if kept == head:
        return None, 0
    return rendered, kept


def render_conversations(conversations: Iterable[Sequence[MessageLike]], tokenizer: Tokenizer, max_tokens: int,
                         counts: CutCounts | None = None,
                         chat_format: ChatFormat = DEFAULT_CHAT_FORMAT) -> Iterator[RenderedConversation]:
    """Each conversation rendered and cut to `max_tokens` (see `cut_to_fit`); the dropped ones left out.

    `counts` (when given) is updated as the conversations go by, for the caller to report.
    """
    counts = counts if counts is not None else CutCounts()
    for messages in conversations:
        rendered, kept = cut_to_fit(messages, tokenizer, max_tokens, chat_format)
        if rendered is None:
            counts.dropped += 1
            continue
        if kept < len(messages):
            counts.cut += 1
        else:
            counts.whole += 1
        yield rendered


# A tokenizer and a model without the chat tokens ---------------------------------------------------


def add_chat_tokens(tokenizer: Tokenizer, chat_format: ChatFormat = DEFAULT_CHAT_FORMAT) -> Tokenizer:
    """A new tokenizer: `tokenizer` with the format's missing special tokens appended as the next ids.

    `tokenizer` itself is left as it was; when it has them all, the result is a copy with the same ids.
    Raises `InputError` when a missing token's string is already an ordinary learned token (a special
    token cannot take its place without changing how text encodes) or the new ids would not follow
    the old ones.
    """
    hf = HFTokenizer.from_str(tokenizer.to_str())
    missing = [token for token in chat_format.tokens if token not in tokenizer.special_tokens]
    if not missing:
        return Tokenizer(hf)
    learned = [token for token in missing if hf.token_to_id(token) is not None]
    if learned:
        raise InputError(f"the tokenizer already has {learned[0]!r} as an ordinary token, so it cannot be added as a "
                         "chat token; use a tokenizer without it")
    size = tokenizer.vocab_size
    hf.add_special_tokens(missing)
    grown = Tokenizer(hf)
    appended = [grown.special_tokens.get(token) for token in missing]
    if appended != list(range(size, size + len(missing))) or grown.vocab_size != size + len(missing):
        raise InputError(f"the chat tokens could not be appended after the tokenizer's {size} ids (they got "
                         f"{appended}); its vocabulary has gaps: use a tokenizer trained by `lm train-tokenizer`")
    return grown


def new_rows(weight: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """`weight` (one row per token id) with rows appended up to `vocab_size`, each the mean of the old rows.

    The mean is taken in float32 whatever the storage type. See the module docstring for why the mean.
    """
    rows = weight.size(0)
    if vocab_size < rows:
        raise UsageError(f"the vocabulary can only grow: {vocab_size} ids asked for, the model has {rows}")
    if vocab_size == rows:
        return weight
    mean = weight.detach().float().mean(dim=0, keepdim=True).to(weight.dtype)
    return torch.cat([weight.detach(), mean.expand(vocab_size - rows, -1)])


def grow_vocab_weights(weights: Mapping[str, torch.Tensor], vocab_size: int) -> dict[str, torch.Tensor]:
    """A saved state dict (as in `model.safetensors`) with its per-token rows grown to `vocab_size`.

    Grows the token embedding and, when the run stores one (an untied head), the output head; a tied
    head is the embedding and is not stored. For `--init-from` a run whose tokenizer gained the chat tokens.
    """
    return {name: new_rows(tensor, vocab_size).contiguous() if name in VOCAB_ROWS else tensor
            for name, tensor in weights.items()}


def grow_vocab(model: GPT, vocab_size: int) -> GPT:
    """Grow `model` in place to `vocab_size` token ids (embedding rows, and head rows when untied); return it.

    Old rows keep their values bit for bit; `model.config` is replaced by one with the new size (the
    old config object is not changed). A tied head stays tied to the grown embedding.
    """
    config = model.config
    if vocab_size == config.vocab_size:
        return model
    embedding = model.tok_emb
    embedding.weight = nn.Parameter(new_rows(embedding.weight, vocab_size),
                                    requires_grad=embedding.weight.requires_grad)
    embedding.num_embeddings = vocab_size
    head = model.lm_head
    if config.tie_embeddings:
        head.weight = embedding.weight
    else:
        head.weight = nn.Parameter(new_rows(head.weight, vocab_size), requires_grad=head.weight.requires_grad)
    head.out_features = vocab_size
    model.config = dataclasses.replace(config, vocab_size=vocab_size)
    return model


# The template travels ----------------------------------------------------------------------------


def jinja_chat_template(chat_format: ChatFormat = DEFAULT_CHAT_FORMAT) -> str:
    """The format as a Jinja `chat_template` (transformers' tokenizer_config.json, GGUF's tokenizer.chat_template).

    Rendered by `apply_chat_template` and encoded with lm's exported tokenizer it gives `render`'s ids
    (see the module docstring for content holding special-token strings). One line, with no text
    between tags but the tokens, so Jinja's whitespace options (transformers sets trim_blocks and
    lstrip_blocks) change nothing. An unknown role stops rendering with `raise_exception`, which both
    transformers and llama.cpp provide.
    """
    markers = chat_format.markers
    return (
        (chat_format.begin or "")
        + "{% for message in messages %}"
        + f"{{% if message['role'] == 'system' %}}{markers[SYSTEM]}"
        + f"{{% elif message['role'] == 'user' %}}{markers[USER]}"
        + f"{{% elif message['role'] == 'assistant' %}}{markers[ASSISTANT]}"
        + "{% else %}{{ raise_exception('unknown role ' + message['role'] + '; roles are system, user, assistant') }}"
        + "{% endif %}"
        + f"{{{{ message['content'] }}}}{chat_format.end}"
        + "{% endfor %}"
        + f"{{% if add_generation_prompt %}}{markers[ASSISTANT]}{{% endif %}}"
    )


# The format a run directory records -------------------------------------------------------------

CHAT_FORMAT_FILE = "chat_format.json"  # in a run directory; a run without it is a base (non-chat) run


def save_chat_format(run_dir: Path, chat_format: ChatFormat) -> None:
    """Record in `run_dir` that its model answers in turns, in `chat_format` (written atomically)."""
    import json

    from lm.atomic import atomic_write_text

    atomic_write_text(Path(run_dir) / CHAT_FORMAT_FILE, json.dumps(chat_format.to_dict(), indent=2) + "\n")


def load_chat_format(run_dir: Path) -> ChatFormat | None:
    """The chat format `run_dir` records, or None for a base run; `InputError` for a damaged record."""
    import json

    path = Path(run_dir) / CHAT_FORMAT_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path} cannot be read as JSON ({err}); the run directory is damaged") from None
    return ChatFormat.from_dict(data, source=str(path))
