"""Conversations: the renderer's ids and mask, record validation and reading, cutting, growing a model's
vocabulary for the chat tokens, and the Jinja template reproduced exactly through transformers."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch
from conftest import write_run
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from lm.chat import (
    DEFAULT_CHAT_FORMAT,
    ChatFormat,
    CutCounts,
    Message,
    RenderedConversation,
    add_chat_tokens,
    chat_token_ids,
    conversation_problem,
    conversation_start,
    cut_to_fit,
    generation_prompt,
    grow_vocab,
    grow_vocab_weights,
    has_chat_tokens,
    jinja_chat_template,
    parse_conversation,
    read_conversations,
    render,
    render_conversations,
    render_turn,
)
from lm.checkpoint import load_weights, model_state_dict
from lm.config import ModelConfig
from lm.errors import InputError, UsageError
from lm.model import GPT
from lm.textfiles import RecordProblems, find_text_files, hold_out_tail
from lm.tokenizer import Tokenizer

CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
UNICODE = "Ünïcödé àçcénts, 日本語のテキスト, 中文, emoji 🕯️🔥👩‍👩‍👧, Ελληνικά, العربية"
MARKERS = "a literal <|end|> and <|user|>, <|assistant|><|system|> and <|endoftext|> typed as text"


def msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


SYSTEM_CHAT = [msg("system", "You answer in one line."), msg("user", "Who holds the lamp?"),
               msg("assistant", "The watchman, my lord.")]
LONG_CHAT = [msg("user", "Hello there."), msg("assistant", "Good morrow."), msg("user", "  How fares the night?\n"),
             msg("assistant", "Cold,\r\nand dark.\n\n"), msg("user", "Then light it."), msg("assistant", "Done.")]
UNICODE_CHAT = [msg("system", UNICODE), msg("user", f"Translate: {UNICODE}"), msg("assistant", UNICODE[::-1]),
                msg("user", "¿Qué? Ça va… naïve café"), msg("assistant", "Très bien 👍")]
CONVERSATIONS = [SYSTEM_CHAT, LONG_CHAT, UNICODE_CHAT]


@pytest.fixture(scope="module")
def chat_tokenizer(sample_tokenizer: Tokenizer) -> Tokenizer:
    return add_chat_tokens(sample_tokenizer)


def ids_of(tokenizer: Tokenizer, token: str) -> int:
    return tokenizer.special_tokens[token]


# The tokenizer gains the chat tokens ----------------------------------------------------------------


def test_add_chat_tokens_appends_exactly_the_missing_tokens(sample_tokenizer: Tokenizer,
                                                            chat_tokenizer: Tokenizer) -> None:
    size = sample_tokenizer.vocab_size
    assert not has_chat_tokens(sample_tokenizer) and has_chat_tokens(chat_tokenizer)
    assert chat_tokenizer.vocab_size == size + 4  # <|endoftext|> was there already
    assert [ids_of(chat_tokenizer, token) for token in CHAT_TOKENS] == list(range(size, size + 4))
    assert sample_tokenizer.vocab_size == size and "<|user|>" not in sample_tokenizer.special_tokens  # untouched
    assert chat_tokenizer.eot_id == sample_tokenizer.eot_id
    for text in (UNICODE, MARKERS, LONG_CHAT[3]["content"]):
        assert chat_tokenizer.encode(text) == sample_tokenizer.encode(text)  # text encodes as before
    assert chat_tokenizer.decode([ids_of(chat_tokenizer, "<|end|>")]) == "<|end|>"
    again = add_chat_tokens(chat_tokenizer)
    assert again.vocab_size == chat_tokenizer.vocab_size and again.special_tokens == chat_tokenizer.special_tokens
    reloaded = Tokenizer.from_str(chat_tokenizer.to_str())  # what a run directory's tokenizer.json gives back
    assert reloaded.special_tokens == chat_tokenizer.special_tokens


def test_a_base_tokenizer_is_refused_with_the_fix(sample_tokenizer: Tokenizer) -> None:
    with pytest.raises(InputError, match=r"no chat token <\|system\|>, <\|user\|>.*fine-tune it on conversations"):
        render(SYSTEM_CHAT, sample_tokenizer)


def test_a_chat_token_spelled_by_a_learned_token_is_refused(sample_tokenizer: Tokenizer) -> None:
    learned = next(token for token in sample_tokenizer.hf.get_vocab() if token.isalpha() and len(token) > 3)
    with pytest.raises(InputError, match="as an ordinary token"):
        add_chat_tokens(sample_tokenizer, ChatFormat(user=learned))


# Rendering and the mask ----------------------------------------------------------------------------


def test_mask_covers_exactly_the_assistant_content_and_end_tokens(chat_tokenizer: Tokenizer) -> None:
    tok = chat_tokenizer
    rendered = render(LONG_CHAT[:4], tok)
    special = {name: ids_of(tok, name) for name in ("<|endoftext|>", *CHAT_TOKENS)}
    expected: list[tuple[list[int], bool]] = [([special["<|endoftext|>"]], False)]
    for message in LONG_CHAT[:4]:
        assistant = message["role"] == "assistant"
        expected += [([special[f"<|{message['role']}|>"]], False), (tok.encode(message["content"]), assistant),
                     ([special["<|end|>"]], assistant)]
    assert rendered.ids == [i for ids, _ in expected for i in ids]
    assert rendered.mask == [learned for ids, learned in expected for _ in ids]
    learned = [i for i, keep in zip(rendered.ids, rendered.mask, strict=True) if keep]
    end = special["<|end|>"]
    assert learned == [*tok.encode("Good morrow."), end, *tok.encode("Cold,\r\nand dark.\n\n"), end]
    assert rendered.learned == len(learned) and not rendered.mask[0]
    assert special["<|assistant|>"] in rendered.ids and not any(  # the marker is given, never learned
        keep for i, keep in zip(rendered.ids, rendered.mask, strict=True) if i == special["<|assistant|>"])
    # next-token loss: target k is ids[k + 1], counted when mask[k + 1] is
    assert rendered.inputs == rendered.ids[:-1] and rendered.targets == rendered.ids[1:]
    assert rendered.target_mask == rendered.mask[1:] and len(rendered.target_mask) == len(rendered.inputs)
    assert tok.decode(rendered.ids) == ("<|endoftext|>" + "".join(
        f"<|{m['role']}|>{m['content']}<|end|>" for m in LONG_CHAT[:4]))


def test_special_token_strings_in_content_stay_text(chat_tokenizer: Tokenizer) -> None:
    conversation = [msg("user", MARKERS), msg("assistant", MARKERS)]
    rendered = render(conversation, chat_tokenizer)
    specials = set(chat_tokenizer.special_tokens.values())
    structure = [i for i in rendered.ids if i in specials]
    assert structure == [ids_of(chat_tokenizer, t) for t in
                         ("<|endoftext|>", "<|user|>", "<|end|>", "<|assistant|>", "<|end|>")]
    assert chat_tokenizer.decode(rendered.ids) == f"<|endoftext|><|user|>{MARKERS}<|end|><|assistant|>{MARKERS}<|end|>"


def test_turn_by_turn_rendering_extends_the_same_ids(chat_tokenizer: Tokenizer) -> None:
    tok = chat_tokenizer
    for conversation in CONVERSATIONS:
        whole = render(conversation, tok)
        for index, message in enumerate(conversation):
            if message["role"] != "assistant":
                continue
            prompt = render(conversation[:index], tok, add_generation_prompt=True)
            reply = [*tok.encode(message["content"]), ids_of(tok, "<|end|>")]  # what a sampled reply adds
            assert prompt.ids + reply == render(conversation[:index + 1], tok).ids
            assert whole.ids[:len(prompt.ids)] == prompt.ids
        # a chat session: the start, then each turn alone; before a reply the generation prompt, then what
        # is sampled up to <|end|>
        session = conversation_start(tok)
        for message in conversation:
            if message["role"] == "assistant":
                reply = [*tok.encode(message["content"]), ids_of(tok, "<|end|>")]
                assert generation_prompt(tok) + RenderedConversation(reply, [True] * len(reply)) == render_turn(
                    message, tok)
                session.extend(generation_prompt(tok))
                session.ids.extend(reply)
                session.mask.extend([True] * len(reply))
            else:
                session.extend(render_turn(message, tok))
        assert session == whole


def test_messages_may_be_dataclasses_or_dicts_and_bad_ones_raise(chat_tokenizer: Tokenizer) -> None:
    as_messages = [Message(m["role"], m["content"]) for m in SYSTEM_CHAT]
    assert render(as_messages, chat_tokenizer) == render(SYSTEM_CHAT, chat_tokenizer)
    assert parse_conversation(SYSTEM_CHAT) == tuple(as_messages)
    with pytest.raises(InputError, match="role 'bot'"):
        render([msg("bot", "hi")], chat_tokenizer)
    with pytest.raises(InputError, match="content is list"):
        render([{"role": "user", "content": ["hi"]}], chat_tokenizer)
    with pytest.raises(InputError, match="no assistant turn"):
        parse_conversation([msg("user", "hi")])


def test_a_format_without_a_start_token_and_its_record(sample_tokenizer: Tokenizer) -> None:
    custom = ChatFormat(system="[SYS]", user="[INST]", assistant="[ASST]", end="[EOT]", begin=None)
    tok = add_chat_tokens(sample_tokenizer, custom)
    assert tok.vocab_size == sample_tokenizer.vocab_size + 4
    rendered = render(SYSTEM_CHAT, tok, chat_format=custom, add_generation_prompt=True)
    assert rendered.ids[0] == ids_of(tok, "[SYS]") and rendered.ids[-1] == ids_of(tok, "[ASST]")
    assert ChatFormat.from_dict(json.loads(json.dumps(custom.to_dict()))) == custom
    assert ChatFormat.from_dict(DEFAULT_CHAT_FORMAT.to_dict()) == DEFAULT_CHAT_FORMAT
    with pytest.raises(InputError, match="not a chat format"):
        ChatFormat.from_dict({"user": "<|user|>", "colour": "red"})
    with pytest.raises(InputError, match="must all differ"):
        ChatFormat.from_dict({**DEFAULT_CHAT_FORMAT.to_dict(), "end": "<|user|>"})
    with pytest.raises(UsageError, match="brace"):
        ChatFormat(end="{{ end }}")
    assert chat_token_ids(tok, custom).begin is None


# Validation and reading ----------------------------------------------------------------------------


SYS, USR, AST = msg("system", "Be brief."), msg("user", "Hi?"), msg("assistant", "Hi.")


@pytest.mark.parametrize(("messages", "problem"), [
    ("hi", "'messages' is a string, not a list of messages"),
    (None, "'messages' is null, not a list"),
    ([], "'messages' is empty"),
    (["hi", AST], "message 1 is a string, not an object with role and content"),
    ([msg("bot", "x"), AST], "message 1 has role 'bot' (roles are system, user, assistant)"),
    ([{"content": "x"}, AST], "message 1 has no role"),
    ([{"role": "user"}, AST], "message 1 (user) has no content"),
    ([USR, msg("assistant", "")], "message 2 (assistant) has empty content"),
    ([msg("user", " \n\t"), AST], "message 1 (user) has empty content"),
    ([{"role": "user", "content": 5}, AST], "message 1 (user) has content of type a number, not a string"),
    ([USR, USR, AST], "message 2 is user where assistant was expected"),
    ([AST, USR], "message 1 is assistant where user was expected"),
    ([SYS, AST], "message 2 is assistant where user was expected"),
    ([USR, SYS, AST], "message 2 is a system message; only the first message may be one"),
    ([SYS, SYS, USR, AST], "message 2 is a system message"),
    ([USR], "no assistant turn to learn from"),
    ([SYS, USR], "no assistant turn to learn from"),
    ([USR, AST, USR], "ends with a user turn that has no assistant reply"),
])
def test_bad_conversations_are_named(messages: object, problem: str) -> None:
    found = conversation_problem(messages)
    assert found is not None and found.startswith(problem), found


def test_good_conversations_and_prompts_pass() -> None:
    for messages in ([USR, AST], [SYS, USR, AST], [SYS, USR, AST, USR, AST], [{**USR, "name": "ignored"}, AST]):
        assert conversation_problem(messages) is None
    for prompt in ([USR], [SYS, USR], [USR, AST, USR], [USR, AST]):  # what lm chat / lm serve send
        assert conversation_problem(prompt, for_training=False) is None
    assert conversation_problem([USR, USR], for_training=False) == (
        "message 2 is user where assistant was expected (after an optional system message, turns alternate user, "
        "assistant)")


def records_file(path: Path, lines: list[str]) -> Path:
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


RECORD_LINES = [
    json.dumps({"messages": SYSTEM_CHAT}),
    "",
    json.dumps({"messages": [msg("bot", "x"), AST]}),
    "{not json",
    json.dumps({"text": "a text record, no messages"}),
    json.dumps({"messages": UNICODE_CHAT, "source": "extra fields are fine"}, ensure_ascii=False),
    json.dumps({"messages": [USR]}),
]


@pytest.mark.parametrize("name", ["chats.jsonl", "chats.jsonl.gz"])
def test_records_are_read_and_bad_ones_reported_with_their_line(tmp_path: Path, name: str) -> None:
    path = records_file(tmp_path / name, RECORD_LINES)
    problems = RecordProblems()
    read = list(read_conversations(find_text_files([path]), problems))
    assert read == [parse_conversation(SYSTEM_CHAT), parse_conversation(UNICODE_CHAT)]
    assert problems.good == 2 and problems.bad == 4
    assert problems.first == f"{path}:3: message 1 has role 'bot' (roles are system, user, assistant)"


def test_held_out_halves_read_every_record_once(tmp_path: Path) -> None:
    lines = [json.dumps({"messages": [msg("user", f"question {i}"), msg("assistant", f"answer {i}")]})
             for i in range(40)]
    lines[25] = "{broken"
    sources = find_text_files([records_file(tmp_path / "many.jsonl", lines)])
    train, held_out = hold_out_tail(sources, 0.2)
    problems = RecordProblems()
    first, second = list(read_conversations(train, problems)), list(read_conversations(held_out, problems))
    assert first and second and len(first) + len(second) == 39
    assert [c[0].content for c in first + second] == [f"question {i}" for i in range(40) if i != 25]
    assert problems.first == f"{sources.files[0]}:26: not JSON"


def test_parquet_messages_column(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    table = pa.table({"messages": pa.array([SYSTEM_CHAT, None, [USR, USR], UNICODE_CHAT], pa.list_(message))})
    path = tmp_path / "chats.parquet"
    pq.write_table(table, path)
    problems = RecordProblems()
    read = list(read_conversations(find_text_files([path]), problems))
    assert read == [parse_conversation(SYSTEM_CHAT), parse_conversation(UNICODE_CHAT)]
    assert problems.bad == 2 and problems.first == f"{path}: row 2: 'messages' is null, not a list of messages"
    no_column = tmp_path / "text.parquet"
    pq.write_table(pa.table({"text": ["just text"]}), no_column)
    with pytest.raises(InputError, match=r"none of the 1 conversation records is usable .*no column 'messages'"):
        list(read_conversations(find_text_files([no_column])))


def test_unusable_inputs_stop_with_one_line(tmp_path: Path) -> None:
    text = tmp_path / "plain.txt"
    text.write_text("To be, or not to be.\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"plain.txt is not JSON Lines or Parquet; records with a 'messages' field"):
        next(read_conversations(find_text_files([text])))
    bad = records_file(tmp_path / "bad.jsonl", ["{}", json.dumps({"messages": []})])
    with pytest.raises(InputError, match=r"none of the 2 conversation records is usable \(first: .*bad.jsonl:1: "
                                         r"no field 'messages'\)"):
        list(read_conversations(find_text_files([bad])))


# Too long: cut at turn boundaries ------------------------------------------------------------------


def test_long_conversations_are_cut_at_turn_boundaries(chat_tokenizer: Tokenizer) -> None:
    tok = chat_tokenizer
    conversation = [SYS, *LONG_CHAT]  # system + 3 exchanges
    length = {k: len(render(conversation[:1 + 2 * k], tok)) for k in (1, 2, 3)}
    for limit, kept in ((length[3], 7), (length[3] - 1, 5), (length[2], 5), (length[2] - 1, 3), (length[1], 3)):
        rendered, count = cut_to_fit(conversation, tok, limit)
        assert count == kept and rendered == render(conversation[:kept], tok) and len(rendered) <= limit
    assert cut_to_fit(conversation, tok, length[1] - 1) == (None, 0)  # the first exchange alone is too long
    no_system, count = cut_to_fit(LONG_CHAT, tok, length[2] - len(render_turn(SYS, tok)))
    assert count == 4 and no_system == render(LONG_CHAT[:4], tok)
    counts = CutCounts()
    fitted = list(render_conversations([conversation, [USR, AST], [msg("user", "word " * 200), AST]], tok,
                                       length[2], counts))
    assert (counts.whole, counts.cut, counts.dropped, counts.kept) == (1, 1, 1, 2)
    assert fitted == [render(conversation[:5], tok), render([USR, AST], tok)]
    with pytest.raises(UsageError):
        cut_to_fit(conversation, tok, 0)


# The model gains rows for the new ids ------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False])
def test_grow_vocab_keeps_old_rows_and_starts_new_tokens_at_the_mean(tied: bool, tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=300, context_length=16, n_layer=1, n_head=2, d_model=16, tie_embeddings=tied)
    model = GPT(config).eval()
    saved = model_state_dict(model)
    ids = torch.tensor([[1, 7, 42, 299, 5]])
    with torch.no_grad():
        before = model(ids)[0]
    assert grow_vocab(model, 304) is model
    assert model.config.vocab_size == 304 and config.vocab_size == 300  # the old config object is unchanged
    embedding, head = model.tok_emb.weight, model.lm_head.weight
    assert embedding.shape == (304, 16) and head.shape == (304, 16) and (head is embedding) == tied
    assert torch.equal(embedding[:300], saved["tok_emb.weight"])
    assert torch.allclose(embedding[300:], saved["tok_emb.weight"].mean(0).expand(4, -1))
    if not tied:
        assert torch.equal(head[:300], saved["lm_head.weight"])
        assert torch.allclose(head[300:], saved["lm_head.weight"].mean(0).expand(4, -1))
    with torch.no_grad():
        after = model(ids)[0]
    assert torch.allclose(after[..., :300], before, atol=1e-6)  # old tokens: the same predictions
    # new tokens: the average logit, so neither favoured nor a huge loss at the first step
    assert torch.allclose(after[..., 300:], before.mean(-1, keepdim=True).expand(-1, -1, 4), atol=1e-5)
    new_ids = torch.tensor([[300, 303, 1, 302]])
    model.train()
    _, loss = model(new_ids[:, :-1], targets=new_ids[:, 1:])
    loss.backward()
    assert torch.isfinite(loss) and model.tok_emb.weight.grad.shape == (304, 16)
    # the saved-weights path (--init-from) gives the same tensors, loadable into a model of the new size
    grown = grow_vocab_weights(saved, 304)
    assert set(grown) == set(saved)
    save_file(grown, str(tmp_path / "grown.safetensors"))
    fresh = GPT(ModelConfig(**{**config.__dict__, "vocab_size": 304}))
    load_weights(fresh, tmp_path / "grown.safetensors")
    assert torch.equal(fresh.tok_emb.weight, model.tok_emb.weight)
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight)
    with pytest.raises(UsageError, match="can only grow"):
        grow_vocab(model, 10)


# The template reproduces lm's ids through transformers --------------------------------------------


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory, chat_tokenizer: Tokenizer):
    """lm's tokenizer as `lm export` writes it for transformers, with the chat template set."""
    transformers = pytest.importorskip("transformers")
    from lm.hf import export_run

    folder = tmp_path_factory.mktemp("chat-export")
    run = write_run(folder / "run", chat_tokenizer, ModelConfig(vocab_size=chat_tokenizer.vocab_size,
                                                                context_length=32, n_layer=1, n_head=2, d_model=16))
    export_run(run, folder / "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder / "hf", local_files_only=True)
    tokenizer.chat_template = jinja_chat_template()
    return tokenizer


def hf_ids(tokenizer, messages: list[dict[str, str]], **options) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, **options))


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_transformers_renders_the_template_to_lms_ids(hf_tokenizer, chat_tokenizer: Tokenizer, index: int) -> None:
    conversation = CONVERSATIONS[index]
    assert hf_ids(hf_tokenizer, conversation) == render(conversation, chat_tokenizer).ids
    for end in range(1, len(conversation)):
        if conversation[end]["role"] == "assistant":  # every prompt for a reply along the way
            prompt = conversation[:end]
            assert (hf_ids(hf_tokenizer, prompt, add_generation_prompt=True)
                    == render(prompt, chat_tokenizer, add_generation_prompt=True).ids)


def test_special_token_strings_in_content_through_transformers(hf_tokenizer, chat_tokenizer: Tokenizer) -> None:
    conversation = [msg("user", MARKERS), msg("assistant", f"ok {MARKERS}")]
    ours = render(conversation, chat_tokenizer).ids
    # By default transformers reads them as control tokens (documented); lm keeps them as text.
    default = hf_ids(hf_tokenizer, conversation)
    assert default != ours and default.count(ids_of(chat_tokenizer, "<|end|>")) > ours.count(
        ids_of(chat_tokenizer, "<|end|>"))
    try:
        sanitized = hf_ids(hf_tokenizer, conversation, sanitize_control_tokens=True)
    except TypeError:  # pragma: no cover - transformers without the option
        pytest.skip("this transformers has no sanitize_control_tokens")
    assert sanitized == ours


@settings(max_examples=40)
@given(contents=st.lists(st.lists(st.sampled_from([*"ab é日🔥\n\t<|>", "the", " lamp", "<|", "|>", "<|end"]),
                                  min_size=1, max_size=12).map("".join).filter(str.strip).filter(
    lambda text: not any(token in text for token in [*CHAT_TOKENS, "<|endoftext|>"])), min_size=2, max_size=5))
def test_any_content_without_marker_strings_matches_transformers(hf_tokenizer, chat_tokenizer: Tokenizer,
                                                                 contents: list[str]) -> None:
    # What lm guarantees: content that does not spell a special token renders to the same ids through
    # transformers' default apply_chat_template. (With marker strings in content, even transformers'
    # sanitize_control_tokens=True differs in places: "  <|system|>" after whitespace, found by this test.)
    conversation = [msg("user" if i % 2 == 0 else "assistant", text) for i, text in enumerate(contents)]
    assert hf_ids(hf_tokenizer, conversation) == render(conversation, chat_tokenizer).ids


def test_the_template_refuses_an_unknown_role(hf_tokenizer) -> None:
    with pytest.raises(Exception, match="unknown role bot"):
        hf_tokenizer.apply_chat_template([msg("bot", "hi")], tokenize=False)
