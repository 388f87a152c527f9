"""Figures in README.md and docs/*.md come from files that scripts write; none is typed.

Two markers tie a figure in a Markdown file to its source (paths relative to the repository root):

- inline, one value from a JSON file::

      <!--fig docs/results/allocation.json#baseline.gap_pct:.1f-->7.8<!--/fig-->

  ``#`` is followed by a dotted key path (list indices as integers) and, after ``:``, a Python
  format spec (empty: ``str(value)``). The text between the markers must equal the formatted
  value.
- block, a whole generated Markdown file (a table a script wrote)::

      <!--include docs/results/ablation.md-->
      ...the file's contents...
      <!--/include-->

Usage::

    python docs/figures.py           # check: exit 1 listing every figure that differs from its source
    python docs/figures.py --write   # rewrite the figures from their sources

``tests/test_docs_figures.py`` runs the check in CI, so a figure cannot drift from the file its
script wrote.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INLINE = re.compile(r"<!--fig (?P<path>[^#\s]+)#(?P<key>[^:\s>]+)(?::(?P<fmt>[^>]*?))?-->(?P<text>.*?)<!--/fig-->", re.S)
BLOCK = re.compile(r"<!--include (?P<path>\S+)-->\n(?P<text>.*?)<!--/include-->", re.S)


def documents(root: Path = ROOT) -> list[Path]:
    """The Markdown files whose figures are checked."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md")), *sorted((root / "spec").glob("*.md"))]


def lookup(data: object, key: str) -> object:
    for part in key.split("."):
        if isinstance(data, list):
            data = data[int(part)]
        elif isinstance(data, dict):
            data = data[part]
        else:
            raise KeyError(key)
    return data


def _inline(m: re.Match, root: Path) -> str:
    data = json.loads((root / m["path"]).read_text(encoding="utf-8"))
    value = lookup(data, m["key"])
    return format(value, m["fmt"]) if m["fmt"] else str(value)


def _block(m: re.Match, root: Path) -> str:
    text = (root / m["path"]).read_text(encoding="utf-8")
    return text if text.endswith("\n") else text + "\n"


def render(text: str, root: Path = ROOT) -> str:
    """``text`` with every figure replaced by its source's value."""
    text = BLOCK.sub(lambda m: f"<!--include {m['path']}-->\n{_block(m, root)}<!--/include-->", text)
    fmt = lambda m: f":{m['fmt']}" if m["fmt"] is not None else ""  # noqa: E731
    return INLINE.sub(lambda m: f"<!--fig {m['path']}#{m['key']}{fmt(m)}-->{_inline(m, root)}<!--/fig-->", text)


def problems(root: Path = ROOT) -> list[str]:
    """One line per figure that differs from its source or whose source cannot be read."""
    out = []
    for doc in documents(root):
        if not doc.is_file():
            continue
        text = doc.read_text(encoding="utf-8")
        for pattern, get in ((INLINE, _inline), (BLOCK, _block)):
            for m in pattern.finditer(text):
                line = text.count("\n", 0, m.start()) + 1
                where = f"{doc.relative_to(root)}:{line}"
                try:
                    want = get(m, root)
                except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
                    out.append(f"{where}: source {m['path']} unusable: {type(e).__name__}: {e}")
                    continue
                if m["text"] != want:
                    out.append(f"{where}: {m['text'][:60]!r} differs from {m['path']} ({want[:60]!r})")
    return out


def main(argv: list[str]) -> int:
    if "--write" in argv:
        for doc in documents():
            if doc.is_file():
                text = doc.read_text(encoding="utf-8")
                new = render(text)
                if new != text:
                    doc.write_text(new, encoding="utf-8")
                    print(f"updated {doc.relative_to(ROOT)}")
    bad = problems()
    for line in bad:
        print(line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
