"""The docs are checked like code: every relative link in README.md and docs/ resolves (anchors included),
and every `lm` (or `make`) command shown in a shell code block names a real subcommand and real options.

Commands are checked in-process against the Typer app's click tree, without running anything, so the
whole file takes well under a second after the import.
"""

from __future__ import annotations

import re
import shlex
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer

from lm.cli.main import app

REPO = Path(__file__).resolve().parent.parent
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]

# Fenced blocks in these languages hold shell commands; an unlabelled block counts as shell too, so
# label anything else (output, file listings) `text`.
SHELL_LANGUAGES = {"", "sh", "bash", "shell", "zsh", "console"}
# In a `console` block only the lines after a `$ ` prompt are commands; the rest is what they print.
PROMPT = "$ "
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<language>[\w+-]*)")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
MARKDOWN_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?(?P<target>[^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_LINK = re.compile(r"""<(?:a|img)\b[^>]*?\b(?:href|src)\s*=\s*["'](?P<target>[^"']+)["']""", re.IGNORECASE)
ATX_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(?P<text>.*?)\s*#*\s*$")
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
# Shell operators that end one command and start the next; redirections take the word after them.
COMMAND_SEPARATORS = {"|", "||", "&&", ";", "&", "(", ")", ";;", "|&"}
REDIRECTIONS = {">", ">>", "<", "<<", "<<<", ">&", "<&", "&>", "&>>"}
# main() strips --debug from anywhere on the line before click sees it (cli/main.py).
OPTIONS_ACCEPTED_ANYWHERE = {"--debug"}


@dataclass(frozen=True)
class Line:
    """A line of a markdown file, or a command joined from several (its first line's number)."""

    path: Path
    number: int
    text: str

    def where(self) -> str:
        return f"{self.path.relative_to(REPO) if self.path.is_relative_to(REPO) else self.path}:{self.number}"


# ---------------------------------------------------------------------------------------------- markdown


def split_fences(path: Path, text: str) -> tuple[list[Line], list[tuple[str, list[Line]]]]:
    """The file's prose lines (outside fenced code) and its fenced blocks as (language, lines)."""
    prose: list[Line] = []
    blocks: list[tuple[str, list[Line]]] = []
    open_fence: str | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        match = FENCE.match(raw)
        if open_fence is None:
            if match:
                open_fence = match["fence"]
                blocks.append((match["language"].lower(), []))
            else:
                prose.append(Line(path, number, raw))
        elif match and raw.strip() == match["fence"] and match["fence"][0] == open_fence[0] \
                and len(match["fence"]) >= len(open_fence):
            open_fence = None
        else:
            blocks[-1][1].append(Line(path, number, raw))
    return prose, blocks


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text as rendered, lowercased, punctuation dropped, spaces
    to hyphens (letters, digits, `_` and `-` stay, in any script)."""
    rendered = MARKDOWN_LINK.sub(lambda m: m.group(0)[m.group(0).index("[") + 1:m.group(0).index("](")], heading)
    rendered = rendered.replace("`", "").replace("*", "")
    kept = "".join(ch for ch in rendered.lower()
                   if ch in " -_" or unicodedata.category(ch)[0] in ("L", "N"))
    return kept.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file; a repeated heading gets -1, -2, ... as on GitHub."""
    prose, _ = split_fences(path, path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    found = set()
    for line in prose:
        match = ATX_HEADING.match(line.text)
        if not match:
            continue
        slug = github_slug(match["text"])
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def link_targets(prose: list[Line]) -> list[tuple[Line, str]]:
    """(line, target) for every markdown link, image and HTML href/src outside code."""
    targets = []
    for line in prose:
        text = INLINE_CODE.sub("", line.text)
        for pattern in (MARKDOWN_LINK, HTML_LINK):
            targets += [(line, match["target"]) for match in pattern.finditer(text)]
    return targets


def link_problems(path: Path, text: str) -> list[str]:
    """What is wrong with the relative links of one markdown file (empty when all resolve)."""
    prose, _ = split_fences(path, text)
    problems = []
    for line, target in link_targets(prose):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("//"):
            continue  # http:, https:, mailto: ...: not this test's business (no network in tests)
        file_part, _, fragment = target.partition("#")
        destination = (path.parent / file_part).resolve() if file_part else path
        if not destination.exists():
            problems.append(f"{line.where()}: link to {target!r}: {file_part} does not exist")
            continue
        if fragment and destination.suffix == ".md" and destination.is_file() \
                and fragment.lower() not in anchors(destination):
            problems.append(f"{line.where()}: link to {target!r}: no heading with anchor #{fragment} "
                            f"in {destination.relative_to(REPO) if destination.is_relative_to(REPO) else destination}")
    return problems


# ---------------------------------------------------------------------------------------------- commands


def shell_commands(path: Path, text: str) -> list[Line]:
    """The command lines of the file's shell code blocks, `\\` continuations joined, prompts removed."""
    _, blocks = split_fences(path, text)
    commands = []
    for language, lines in blocks:
        if language not in SHELL_LANGUAGES:
            continue
        current: Line | None = None
        for line in lines:
            raw = line.text.strip()
            if current is None:
                if language == "console":
                    if not (raw.startswith(PROMPT) or raw == PROMPT.strip()):
                        continue  # output
                    raw = raw[len(PROMPT):]
                if not raw:
                    continue
                current = Line(path, line.number, "")
            continued = raw.endswith("\\") and not raw.endswith("\\\\")
            current = Line(path, current.number, current.text + " " + (raw[:-1] if continued else raw))
            if not continued:
                commands.append(current)
                current = None
        if current is not None:
            commands.append(current)
    return commands


def simple_commands(line: Line) -> list[list[str]]:
    """The words of each simple command on a shell line: split at pipes, `&&`, `;` and `$(`...`)`,
    with redirections dropped. Raises ValueError where the line is not valid shell (an open quote)."""
    lexer = shlex.shlex(line.text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    skip_next = False
    for token in lexer:
        if skip_next:
            skip_next = False
        elif token in COMMAND_SEPARATORS:
            commands.append([])
        elif token in REDIRECTIONS:
            skip_next = True
        else:
            commands[-1].append(token)
    return [words for words in commands if words]


def lm_arguments(words: list[str]) -> list[str] | None:
    """The arguments given to `lm` by this simple command, or None if it does not run `lm`:
    `lm ...`, `.venv/bin/lm ...`, `LM_X=1 lm ...`, `python -m lm ...`, `torchrun ... -m lm ...`."""
    while words and ENV_ASSIGNMENT.match(words[0]):
        words = words[1:]
    if words and (words[0] == "lm" or words[0].endswith("/lm")):  # not `lm/`, the folder
        return words[1:]
    for i, word in enumerate(words[:-1]):
        if word == "-m" and words[i + 1] == "lm":
            return words[i + 2:]
    return None


def make_targets() -> set[str]:
    """The targets the Makefile defines (rules named at the start of a line)."""
    rule = re.compile(r"^(?P<names>[A-Za-z0-9_.%/-]+(?:\s+[A-Za-z0-9_.%/-]+)*)\s*::?(?!=)")
    targets = set()
    for raw in (REPO / "Makefile").read_text(encoding="utf-8").splitlines():
        match = rule.match(raw)
        if match:
            targets.update(name for name in match["names"].split() if not name.startswith("."))
    return targets


def option_table(command) -> dict[str, bool]:
    """Every option name a click command accepts, and whether it takes a value."""
    table = {name: False for name in app_command().context_settings.get("help_option_names", ["--help"])}
    table.update(dict.fromkeys(OPTIONS_ACCEPTED_ANYWHERE, False))
    for param in command.params:
        if param.param_type_name != "option":
            continue
        takes_value = not (param.is_flag or param.count)
        for name in (*param.opts, *param.secondary_opts):
            table[name] = takes_value
    return table


_app_command = None


def app_command():
    """The `lm` click group (built once: Typer builds it afresh on every call)."""
    global _app_command
    if _app_command is None:
        _app_command = typer.main.get_command(app)
    return _app_command


def unknown_options(arguments: list[str], options: dict[str, bool]) -> list[str]:
    """The option words in `arguments` that `options` does not know, in order. A word after an option
    that takes a value is that value, whatever it looks like; `--` ends the options."""
    unknown = []
    words = iter(arguments)
    for word in words:
        if word == "--":
            break
        if not word.startswith("-") or word == "-":
            continue  # a positional argument (`-` is standard input)
        name, has_value, _ = word.partition("=") if word.startswith("--") else (word, "", "")
        if name in options:
            if options[name] and not has_value:
                next(words, None)
        elif not word.startswith("--") and options.get(word[:2]):
            continue  # `-B64`: a short option with its value attached
        else:
            unknown.append(word)
    return unknown


def lm_problems(arguments: list[str]) -> list[str]:
    """What is wrong with one `lm` command line (empty when click would accept its names)."""
    root = app_command()
    root_options = option_table(root)
    position = 0
    while position < len(arguments) and arguments[position].startswith("-"):
        if arguments[position] not in root_options:
            return [f"`lm` has no option {arguments[position]}"]
        position += 1
    if position == len(arguments):
        return []  # `lm`, `lm --help`, `lm --version`
    name = arguments[position]
    if name not in root.commands:
        return [f"`lm` has no subcommand {name!r} (it has: {', '.join(sorted(root.commands))})"]
    command = root.commands[name]
    return [f"`lm {name}` has no option {option}"
            for option in unknown_options(arguments[position + 1:], option_table(command))]


def command_problems(path: Path, text: str) -> tuple[list[str], list[list[str]]]:
    """What is wrong with the file's shell commands, and every simple command found (for the checks
    that the scan found what it should)."""
    problems: list[str] = []
    found: list[list[str]] = []
    targets = make_targets()
    for line in shell_commands(path, text):
        try:
            commands = simple_commands(line)
        except ValueError as error:
            problems.append(f"{line.where()}: not valid shell ({error}); label a block that is not "
                            f"commands ```text: {line.text.strip()}")
            continue
        for words in commands:
            found.append(words)
            arguments = lm_arguments(words)
            if arguments is not None:
                problems += [f"{line.where()}: {problem}: {line.text.strip()}" for problem in lm_problems(arguments)]
            elif words[0] == "make":
                problems += [f"{line.where()}: the Makefile has no target {word!r}: {line.text.strip()}"
                             for word in words[1:] if not word.startswith("-") and "=" not in word
                             and word not in targets]
    return problems, found


# ---------------------------------------------------------------------------------------------- tests


def doc_id(path: Path) -> str:
    return str(path.relative_to(REPO))


@pytest.mark.parametrize("path", DOC_FILES, ids=doc_id)
def test_relative_links_resolve(path: Path) -> None:
    problems = link_problems(path, path.read_text(encoding="utf-8"))
    assert not problems, "broken links:\n" + "\n".join(problems)


@pytest.mark.parametrize("path", DOC_FILES, ids=doc_id)
def test_commands_shown_parse(path: Path) -> None:
    problems, _ = command_problems(path, path.read_text(encoding="utf-8"))
    assert not problems, "commands that `lm` (or make) would refuse:\n" + "\n".join(problems)


def test_readme_shows_the_two_setup_commands() -> None:
    _, found = command_problems(REPO / "README.md", (REPO / "README.md").read_text(encoding="utf-8"))
    for setup in (["make", "demo"], ["make", "test"]):
        assert setup in found, f"README.md shows no `{' '.join(setup)}` in a shell code block"


def test_the_scan_sees_every_subcommand_in_use() -> None:
    """Guards the parser itself: if it silently found nothing, the tests above would pass on anything."""
    used = set()
    for path in DOC_FILES:
        for words in command_problems(path, path.read_text(encoding="utf-8"))[1]:
            arguments = lm_arguments(words)
            if arguments:
                used.add(next((word for word in arguments if not word.startswith("-")), ""))
    assert set(app_command().commands) <= used, f"no example shown for: {set(app_command().commands) - used}"


def test_the_checks_catch_a_broken_link_a_bogus_option_and_a_missing_subcommand(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other page\n\n## A `code` heading: with punctuation!\n")
    page.write_text(
        "# Page\n\n"
        "[fine](other.md#a-code-heading-with-punctuation) [gone](missing.md) [bad anchor](other.md#nope)\n"
        "![picture](images/none.png) [self](#page) [web](https://example.org/x)\n\n"
        "```sh\n"
        "lm generate runs/demo --prompt 'x' --stats   # fine\n"
        "LM_DEBUG=1 lm train data/sample.txt --out /tmp/x \\\n"
        "    --max-steps 20 --bogus-flag 3\n"
        "lm info runs/a | head -n 3 && lm frobnicate runs/a\n"
        "make demo && make no-such-target\n"
        "```\n\n"
        "```console\n"
        "$ lm eval runs/a --text t.txt --max-steps=3\n"
        "lm output line that is not a command --whatever\n"
        "```\n")
    text = page.read_text()
    links = link_problems(page, text)
    assert [problem.split(": ")[0] for problem in links] == [f"{page}:3", f"{page}:3", f"{page}:4"]
    assert "missing.md" in links[0] and "#nope" in links[1] and "images/none.png" in links[2]
    problems, _ = command_problems(page, text)
    assert len(problems) == 4, problems
    assert problems[0].startswith(f"{page}:8: `lm train` has no option --bogus-flag")
    assert problems[1].startswith(f"{page}:10: `lm` has no subcommand 'frobnicate'")
    assert problems[2].startswith(f"{page}:11: the Makefile has no target 'no-such-target'")
    assert problems[3].startswith(f"{page}:15: `lm eval` has no option --max-steps=3")


def test_github_slugs() -> None:
    assert github_slug("Two kinds of CPU") == "two-kinds-of-cpu"
    assert github_slug("`lm train --init-from`") == "lm-train---init-from"
    assert github_slug("Run it in llama.cpp / Ollama") == "run-it-in-llamacpp--ollama"
    assert github_slug("What the demo model's heads do") == "what-the-demo-models-heads-do"
    assert github_slug("`metrics.jsonl`") == "metricsjsonl"
