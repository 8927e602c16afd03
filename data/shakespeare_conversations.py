"""Conversations for `make demo-chat`, made from the plays of the default corpus (`lm corpus shakespeare`).

Each conversation is a stretch of dialogue in which two characters speak in turn: the system prompt
names the character who answers ("You are Juliet, in Romeo and Juliet."), the user's turns are the
other character's speeches, the assistant's turns are the answering character's. So a model fine-tuned
on them learns to answer a line in the voice of a named character and then to end its turn. Stage
directions are left out; a stretch is cut into conversations of at most three exchanges, and speeches
longer than --max-chars are not used (the demo model's context is short).

The training conversations come from the plays in CORPUS/train, the held-out ones from CORPUS/heldout:
the model and its tokenizer never saw the held-out plays, so their scores are honest.

    python data/shakespeare_conversations.py data/shakespeare --out runs/conversations
    # writes runs/conversations/train.jsonl and runs/conversations/heldout.jsonl
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterator
from pathlib import Path

SPEAKER = re.compile(r"^([A-Z][A-Za-z' ]{1,30})\.$")  # "Romeo." / "FIRST WITCH." alone on a line
SCENE = re.compile(r"^(ACT|Act|SCENE|Scene)\b")
STAGE_DIRECTION = re.compile(r"\[[^\]]*\]")
MAX_EXCHANGES = 3
CROWDS = {"All", "Both", "Citizens", "Lords"}  # many voices at once: no one character to be


def play_title(path: Path) -> str:
    """'romeo_and_juliet_gut.txt' -> 'Romeo and Juliet'."""
    words = path.name.removesuffix("_gut.txt").split("_")
    small = {"and", "of", "the", "in", "that", "a"}
    return " ".join(w if i and w in small else w.capitalize() for i, w in enumerate(words))


def scenes(text: str) -> Iterator[list[tuple[str, str]]]:
    """Each scene's speeches in order, as (speaker, speech) with stage directions removed."""
    speeches: list[tuple[str, str]] = []
    speaker: str | None = None
    lines: list[str] = []

    def close() -> None:
        nonlocal speaker, lines
        speech = " ".join(STAGE_DIRECTION.sub("", " ".join(lines)).split())
        if speaker and speech:
            speeches.append((speaker, speech))
        speaker, lines = None, []

    previous_blank = True
    for raw in text.splitlines():
        line = raw.strip()
        if SCENE.match(line):
            close()
            if speeches:
                yield speeches
            speeches = []
        elif previous_blank and (match := SPEAKER.match(line)):
            close()
            speaker = match.group(1).title()
        elif not line:
            close() if speaker and lines else None
        elif speaker is not None:
            lines.append(line)
        previous_blank = not line
    close()
    if speeches:
        yield speeches


def conversations(path: Path, max_chars: int) -> Iterator[dict[str, list[dict[str, str]]]]:
    """Two characters speaking in turn, as `messages` records (see the module docstring)."""
    title = play_title(path)
    for speeches in scenes(path.read_text(encoding="utf-8", errors="replace")):
        start = 0
        while start < len(speeches) - 1:
            end = start + 1  # the stretch speeches[start:end] alternates between two speakers
            while (end < len(speeches) and speeches[end][0] != speeches[end - 1][0]
                   and speeches[end][0] in (speeches[start][0], speeches[start + 1][0])
                   and len(speeches[end][1]) <= max_chars):
                end += 1
            stretch = speeches[start:end]
            for first in range(0, len(stretch) - 1, 2 * MAX_EXCHANGES):
                part = stretch[first:first + 2 * MAX_EXCHANGES]
                part = part[:len(part) // 2 * 2]
                if len(part) < 2 or len(part[0][1]) > max_chars or part[0][0] == part[1][0]:
                    continue
                answering = part[1][0]
                if answering in CROWDS:
                    continue
                messages = [{"role": "system", "content": f"You are {answering}, in {title}."}]
                messages += [{"role": "user" if index % 2 == 0 else "assistant", "content": speech}
                             for index, (_, speech) in enumerate(part)]
                yield {"messages": messages}
            start = max(end, start + 1)


def write(folder: Path, out: Path, max_chars: int) -> int:
    count = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as handle:
        for path in sorted(folder.glob("*.txt")):
            for record in conversations(path, max_chars):
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("corpus", type=Path, help="the folder `lm corpus shakespeare --out` made (train/, heldout/)")
    parser.add_argument("--out", type=Path, default=Path("runs/conversations"))
    parser.add_argument("--max-chars", type=int, default=300, help="longest speech used, in characters")
    args = parser.parse_args()
    for split in ("train", "heldout"):
        count = write(args.corpus / split, args.out / f"{split}.jsonl", args.max_chars)
        print(f"{args.out / f'{split}.jsonl'}: {count:,} conversations from {args.corpus / split}")


if __name__ == "__main__":
    main()
