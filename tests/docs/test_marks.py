"""Every code block a reader would run is marked, and every block marked runnable is run:
the guard that keeps a new snippet from slipping into the documentation unrun
(tests/docs/snippets.py says what the marks are)."""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

from tests.docs.snippets import ILLUSTRATIVE, all_blocks, parse

RUNNER = Path(__file__).with_name("test_snippets.py")


def strings_of_the_runner() -> set[str]:
    """Every string literal of test_snippets.py: the names it passes to ``snippet(…)``, directly
    or through a table of its parametrized tests."""
    tree = ast.parse(RUNNER.read_text())
    return {node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)}


def unmarked(text: str, page: str) -> list[str]:
    blocks, problems = parse(text, page)
    return problems + [f"{b.where}: a {b.lang or 'plain'} block without a mark"
                       for b in blocks if b.wants_mark and b.mark is None]


def test_every_block_a_reader_would_run_is_marked_runnable_or_illustrative() -> None:
    blocks, problems = all_blocks()
    missing = problems + [f"{b.where}: a {b.lang or 'plain'} block without a mark"
                          for b in blocks if b.wants_mark and b.mark is None]
    assert missing == [], (
        "mark each block on the line before its fence: <!-- snippet: NAME --> and run it in "
        "tests/docs/test_snippets.py, or <!-- snippet: illustrative --> when it cannot run "
        "as written:\n" + "\n".join(missing))


def test_every_block_marked_runnable_is_run_by_a_test_and_names_are_unique() -> None:
    blocks, _ = all_blocks()
    marked = Counter(b.mark for b in blocks if b.mark not in (None, ILLUSTRATIVE))
    assert [name for name, n in marked.items() if n > 1] == []
    # (A name the runner asks for that no block has fails there: snippet() finds no block.)
    assert sorted(set(marked) - strings_of_the_runner()) == [], (
        "marked runnable, but tests/docs/test_snippets.py does not run it")


def test_the_guard_finds_what_it_is_for() -> None:
    page = "\n".join([
        "# A page", "",
        "```python", "print('unmarked')", "```", "",
        "<!-- snippet: illustrative -->", "```php", "<?php echo 1;", "```", "",
        "<!-- snippet: a-name -->", "", "```js", "console.log(1)", "```",
        "```sh", "make demo", "```",                      # no curl: set-up, not a client
        "```bash", "curl -sS http://127.0.0.1:8790/healthz", "```",
        "<!-- snippet: orphan -->", "Some text.",
        "<!-- snippets: typo -->", "```toml", "a = 1", "```",
    ])
    assert unmarked(page, "p.md") == [
        "p.md:23: mark 'orphan' has no block",
        "p.md:25: not a mark (<!-- snippet: NAME -->): '<!-- snippets: typo -->'",
        "p.md:3: a python block without a mark",
        "p.md:20: a bash block without a mark",
    ]
