"""`lm chat`: talk to a chat model in the terminal, or pipe user turns through it, one per line."""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import sys
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from lm.cli import generate

if TYPE_CHECKING:
    from rich.console import Console

    from lm.chat_session import ChatSession, ContextTrimmed, TurnStats

COMMANDS = "/reset, /system TEXT, /save FILE, /quit"


def _generate_option(name: str, help: str | None = None) -> Any:
    """`lm generate`'s option `name` (its Annotated type), so both commands define it once;
    `help` replaces its help text where chat reads it differently."""
    annotated = typing.get_type_hints(generate.command, include_extras=True)[name]
    if help is None:
        return annotated
    base, info = typing.get_args(annotated)
    info = copy.copy(info)
    info.help = help
    return Annotated[base, info]


_DEFAULTS = {name: parameter.default for name, parameter in inspect.signature(generate.command).parameters.items()}

MaxNewTokens = _generate_option("max_new_tokens", "Tokens sampled per reply at most.")
Temperature = _generate_option("temperature")
TopK = _generate_option("top_k")
TopP = _generate_option("top_p")
MinP = _generate_option("min_p")
RepetitionPenalty = _generate_option(
    "repetition_penalty",
    "Divide the scores of tokens already in the conversation by R (1: off; the chat's own tokens never count).")
Seed = _generate_option(
    "seed", "Seed for sampling: the same seed and messages give the same replies [default: random, shown by --stats].")
Device = _generate_option("device")
Dtype = _generate_option("dtype")
Quantize = _generate_option("quantize")


def command(
    run_dir: Annotated[Path, typer.Argument(
        metavar="RUN_DIR", show_default=False,
        help="A chat run: one fine-tuned on conversations (`lm train CONVERSATIONS.jsonl --init-from RUN`).")],
    system: Annotated[str | None, typer.Option(
        "--system", metavar="TEXT", show_default=False,
        help="A system prompt: what the model is told before the conversation (/system TEXT changes it).")] = None,
    max_new_tokens: MaxNewTokens = _DEFAULTS["max_new_tokens"],
    temperature: Temperature = _DEFAULTS["temperature"],
    top_k: TopK = _DEFAULTS["top_k"],
    top_p: TopP = _DEFAULTS["top_p"],
    min_p: MinP = _DEFAULTS["min_p"],
    repetition_penalty: RepetitionPenalty = _DEFAULTS["repetition_penalty"],
    seed: Seed = _DEFAULTS["seed"],
    device: Device = _DEFAULTS["device"],
    dtype: Dtype = _DEFAULTS["dtype"],
    quantize: Quantize = _DEFAULTS["quantize"],
    stats: Annotated[bool, typer.Option(
        "--stats", metavar="",
        help="After each reply, print the tokens the turn prefilled and decoded and tokens/s to stderr.")] = False,
) -> None:
    """Chat with a model fine-tuned on conversations; replies stream as they are sampled.

    Commands: /reset (forget the conversation, keep the system prompt), /system TEXT (replace the
    system prompt; /system alone removes it), /save FILE (the conversation as a {"messages": [...]}
    JSON record), /quit (or Ctrl-D). Each turn reads only its own tokens: the conversation so far
    stays in the model's cache. When the context fills, the oldest exchanges are dropped (the system
    prompt stays) and a notice says so.

    Without a terminal, user turns are read from standard input, one per line, and each reply is
    written to standard output followed by a newline; notices and --stats go to standard error.
    """
    # Every value is checked before the model is loaded.
    sampling = generate.check_decoding_options(temperature, top_k, top_p, min_p, repetition_penalty, max_new_tokens,
                                               dtype, quantize)

    from lm.chat_session import ChatSession, chat_format_of
    from lm.checkpoint import load_run
    from lm.device import resolve_device, resolve_dtype
    from lm.generate import prepare_for_generation

    chat_format = chat_format_of(run_dir)  # a base run is refused before its weights are read
    torch_device = resolve_device(device)
    model, tokenizer, _ = load_run(run_dir, torch_device)
    model = prepare_for_generation(model, resolve_dtype(dtype, torch_device), quantize)
    session = ChatSession(model, tokenizer, chat_format, sampling=sampling, max_new_tokens=max_new_tokens,
                          system=system, seed=seed)
    interactive = _stdin_is_a_terminal()
    chat = Chat(session, interactive=interactive, show_stats=stats)
    if interactive:
        _notice(f"{run_dir}: context of {session.context_length:,} tokens. {COMMANDS} (or Ctrl-D).")
    if stats:
        precision = str(next(model.parameters()).dtype).removeprefix("torch.")
        precision += ", int8 linear layers" if quantize == "int8" else ""
        _notice(f"{session.device}, {precision}, {session.step.kernels}; seed {session.seed}")
    for line in _terminal_lines() if interactive else _piped_lines():
        if not chat.handle(line):
            break


@dataclass
class Chat:
    """The loop's state: what each line typed (or piped) does."""

    session: ChatSession
    interactive: bool
    show_stats: bool
    turns: int = 0

    def handle(self, line: str) -> bool:
        """Act on one line: a command or a user turn. False when the chat should end.

        In a terminal a problem is reported and the chat goes on; from a pipe it ends the run (the
        one-line error and exit status a script can check).
        """
        from lm.errors import LmError

        try:
            return self._command(line) if line.startswith("/") else self._turn(line)
        except LmError as err:
            if not self.interactive:
                raise
            _stderr().print(f"error: {' '.join(str(err).split())}", style="red", markup=False, highlight=False,
                            soft_wrap=True)
            return True

    def _command(self, line: str) -> bool:
        from lm.errors import UsageError

        name, _, argument = line[1:].partition(" ")
        argument = argument.strip()
        if name in ("quit", "exit"):
            return False
        if name == "reset":
            self.session.reset()
            _notice("the conversation is cleared" + (" (the system prompt stays)" if self.session.system else ""))
        elif name == "system":
            self.session.set_system(argument or None)
            _notice("the system prompt is set" if argument else "the system prompt is removed")
        elif name == "save":
            if not argument:
                raise UsageError("/save needs a file: /save FILE")
            path = save_conversation(self.session, Path(argument).expanduser())
            _notice(f"saved {len(self.session.messages)} messages to {path}")
        elif name == "help":
            _notice(f"commands: {COMMANDS}")
        else:
            raise UsageError(f"unknown command /{name}; the commands are {COMMANDS}")
        return True

    def _turn(self, text: str) -> bool:
        from lm.chat_session import TurnStats

        stats = TurnStats()
        replies = self.session.reply(text, stats)
        held: list[ContextTrimmed] = []  # said after the reply when it came in the middle of one
        out, wrote = sys.stdout, False
        try:
            for item in replies:
                if isinstance(item, str):
                    out.write(item)
                    out.flush()
                    wrote = True
                elif wrote:
                    held.append(item)
                else:
                    self._say_trimmed(item)
        except KeyboardInterrupt:
            if not self.interactive:
                raise
            replies.close()  # the reply so far stays in the conversation
            out.write("\n")
            _notice("(stopped)")
        else:
            out.write("\n")
        out.flush()
        self.turns += 1
        for item in held:
            self._say_trimmed(item)
        if self.show_stats:
            _notice(turn_stats_line(self.turns, stats, self.session.context_length))
        return True

    def _say_trimmed(self, item: ContextTrimmed) -> None:
        kept = " (the system prompt stays)" if self.session.system else ""
        _notice(f"the context ({item.context_length:,} tokens) is full: dropped the oldest "
                f"{item.dropped_messages} messages{kept}")


def save_conversation(session: ChatSession, path: Path) -> Path:
    """Write the conversation as one {"messages": [...]} JSON line (a record training reads), atomically."""
    from lm.atomic import atomic_write_text, prepare_output

    prepare_output(path, overwrite=True, what="conversation file")
    atomic_write_text(path, json.dumps(session.record(), ensure_ascii=False) + "\n")
    return path


def turn_stats_line(turn: int, stats: TurnStats, context_length: int) -> str:
    stopped = {"length": ", stopped at --max-new-tokens", "context": ", stopped: the context is full"}
    return (f"turn {turn}: prefill {stats.prefill_tokens:,} tokens in {stats.prefill_s * 1000:,.1f} ms; "
            f"reply {stats.decoded_tokens:,} tokens at {stats.decode_tokens_per_s:,.1f} tokens/s"
            f"{stopped.get(stats.stop, '')}; context {stats.context_tokens:,}/{context_length:,} tokens")


def _terminal_lines() -> Iterator[str]:
    """Lines typed at a prompt (with line editing where Python has readline), until Ctrl-D or Ctrl-C."""
    with contextlib.suppress(ImportError):  # Windows has none
        import readline  # noqa: F401  (importing it is what gives input() editing and history)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            sys.stdout.write("\n")
            return
        if line.strip():
            yield line.strip()


def _stdin_is_a_terminal() -> bool:
    return sys.stdin.isatty()


def _piped_lines() -> Iterator[str]:
    """One user turn (or command) per line of standard input; blank lines are skipped."""
    for line in sys.stdin:
        if line.strip():
            yield line.strip()


def _notice(text: str) -> None:
    _stderr().print(text, style="dim", markup=False, highlight=False, soft_wrap=True)


def _stderr() -> Console:
    from lm.cli.render import stderr

    return stderr()
