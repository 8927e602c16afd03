"""What chat fine-tuning bought: held-out assistant bits per byte before and after, and replies that end.

    python bench/chat.py runs/chat --conversations runs/conversations/heldout.jsonl [--replies 50]

Before/after: the run's validation on the assistant tokens of its held-out conversations at step 0
(the base model with the chat tokens' new rows, before any fine-tuning step: `--init-from` runs score
it first) and at its last evaluation, read from its metrics.jsonl. Ending: the first user turn of each
of the first `--replies` held-out conversations (with its system prompt) is answered by `lm chat`'s
session, sampling at temperature 0.8, up to `--max-new-tokens`; the share of replies that stop at the
end-of-turn token (rather than running out of tokens) says whether the model learned to end a turn.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from lm.chat import ASSISTANT, SYSTEM, USER, read_conversations
from lm.chat_session import ChatSession, TurnStats, chat_format_of
from lm.checkpoint import load_run
from lm.device import cpu_name
from lm.generate import prepare_for_generation
from lm.sampling import SamplingConfig
from lm.textfiles import find_text_files


def validation_records(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [record for record in records if "val_loss" in record]


def ending_share(run: Path, conversations: Path, replies: int, max_new_tokens: int, seed: int) -> tuple[int, int]:
    """(replies that ended at <|end|>, replies sampled)."""
    model, tokenizer, _ = load_run(run)
    model = prepare_for_generation(model)
    chat_format = chat_format_of(run)
    ended = total = 0
    for messages in read_conversations(find_text_files([conversations])):
        if total == replies:
            break
        system = next((m.content for m in messages if m.role == SYSTEM), None)
        first_user = next(m.content for m in messages if m.role == USER)
        assert any(m.role == ASSISTANT for m in messages)
        session = ChatSession(model, tokenizer, chat_format, sampling=SamplingConfig(temperature=0.8),
                              max_new_tokens=max_new_tokens, system=system, seed=seed + total)
        stats = TurnStats()
        with torch.inference_mode():
            for _ in session.reply(first_user, stats):
                pass
        ended += stats.stop == "end"
        total += 1
    return ended, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a chat run (fine-tuned with lm train ... --init-from)")
    parser.add_argument("--conversations", type=Path, required=True, help="held-out conversations (.jsonl)")
    parser.add_argument("--replies", type=int, default=50)
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    scored = validation_records(args.run)
    ended, total = ending_share(args.run, args.conversations, args.replies, args.max_new_tokens, args.seed)
    table = Table(title=f"Chat fine-tuning of {args.run} (bench/chat.py), {cpu_name()}", title_justify="left")
    for column in ("", "step", "assistant loss (nats/token)", "assistant bits/byte"):
        table.add_column(column, justify="right" if column else "left")
    for label, record in (("before (step 0)", scored[0]), ("after", scored[-1])):
        table.add_row(label, str(record["step"]), f"{record['val_loss']:.3f}", f"{record['val_bpb']:.3f}")
    Console().print(table)
    Console().print(f"Replies that end at the end-of-turn token: {ended} of {total} ({ended / total:.0%}), "
                    f"temperature 0.8, at most {args.max_new_tokens} tokens each")


if __name__ == "__main__":
    main()
