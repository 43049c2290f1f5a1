"""The code blocks of the documentation (README.md and docs/) and their marks.

A block a reader is meant to run is marked, on the nearest non-blank line before its fence,
with ``<!-- snippet: NAME -->`` (an HTML comment: invisible on the site and on GitHub);
tests/docs/test_snippets.py runs it by that name against the simulator and a real
``keeper serve``. A block that only shows a shape (placeholders such as ``kpr_…``, a
production host's paths) is marked ``<!-- snippet: illustrative -->``. Every block in a
language a reader would run (Python, JavaScript, PHP, and shell that calls curl) carries one
of the two marks: tests/docs/test_marks.py fails on one that carries neither."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
ILLUSTRATIVE = "illustrative"

#: Languages whose every block is a program a reader may run.
PROGRAM_LANGUAGES = frozenset({"python", "py", "python3", "js", "javascript", "node", "mjs",
                               "ts", "typescript", "php"})
#: Shell blocks are runnable when they call keeper's API (curl); the others (make targets,
#: installation steps, systemd) are set-up a test cannot run as written.
SHELL_LANGUAGES = frozenset({"", "sh", "bash", "shell", "console", "zsh", "shell-session"})

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([\w+-]*)[^\n]*$")
_MARK = re.compile(r"^\s*<!--\s*snippet:\s*([\w.-]+)\s*-->\s*$")
_MARK_LIKE = re.compile(r"^\s*<!--\s*snippet", re.IGNORECASE)


@dataclass(frozen=True)
class Block:
    page: str  # relative to the repository root
    line: int  # of the opening fence, from 1
    lang: str
    body: str
    mark: str | None  # a snippet's name, ILLUSTRATIVE, or None

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"

    @property
    def wants_mark(self) -> bool:
        """Whether a reader would run it: a program, or shell that calls keeper's API."""
        lang = self.lang.lower()
        return lang in PROGRAM_LANGUAGES or (
            lang in SHELL_LANGUAGES and re.search(r"\bcurl\b", self.body) is not None)


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def parse(text: str, page: str) -> tuple[list[Block], list[str]]:
    """The page's fenced blocks, and its problems: a mark that does not stand right before a
    block, or a comment that looks like a mark but is not one."""
    lines = text.splitlines()
    blocks: list[Block] = []
    problems: list[str] = []
    pending: tuple[str, int] | None = None  # a mark waiting for its block
    i = 0
    while i < len(lines):
        line = lines[i]
        fence = _FENCE.match(line)
        if fence:
            close = re.compile(rf"^ {{0,3}}{fence[1][0]}{{{len(fence[1])},}}\s*$")
            end = next((j for j in range(i + 1, len(lines)) if close.match(lines[j])),
                       len(lines))
            blocks.append(Block(page, i + 1, fence[2], "\n".join(lines[i + 1:end]) + "\n",
                                pending[0] if pending else None))
            pending = None
            i = end + 1
            continue
        mark = _MARK.match(line)
        if mark:
            if pending:
                problems.append(f"{page}:{pending[1]}: mark {pending[0]!r} has no block")
            pending = (mark[1], i + 1)
        elif _MARK_LIKE.match(line):
            problems.append(f"{page}:{i + 1}: not a mark (<!-- snippet: NAME -->): {line!r}")
        elif line.strip() and pending:
            problems.append(f"{page}:{pending[1]}: mark {pending[0]!r} has no block")
            pending = None
        i += 1
    if pending:
        problems.append(f"{page}:{pending[1]}: mark {pending[0]!r} has no block")
    return blocks, problems


def all_blocks() -> tuple[list[Block], list[str]]:
    blocks: list[Block] = []
    problems: list[str] = []
    for path in pages():
        found, wrong = parse(path.read_text(), str(path.relative_to(ROOT)))
        blocks += found
        problems += wrong
    return blocks, problems


def snippet(name: str) -> Block:
    """The block marked ``name``, exactly as a reader copies it."""
    found = [b for b in all_blocks()[0] if b.mark == name]
    assert len(found) == 1, f"{len(found)} blocks are marked {name!r}"
    return found[0]
