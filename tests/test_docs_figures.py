"""Figures in README.md, docs/ and spec/ equal the files their scripts wrote (docs/figures.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("doc_figures", ROOT / "docs" / "figures.py")
figures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(figures)


def test_every_figure_equals_its_source():
    assert figures.problems() == []


def test_readme_quotes_sources():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert figures.INLINE.search(text) or figures.BLOCK.search(text)


def test_every_measured_bullet_of_the_readme_quotes_a_source():
    """A bullet of README's "Measured" section that states a number carries a figure marker."""
    import re

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Measured", 1)[1].split("\n## ", 1)[0]
    bullets = [b for b in re.split(r"\n(?=- )", section) if b.startswith("- ")]
    assert len(bullets) >= 5
    number = re.compile(r"(?<![\w.])\d[\d.,]*(?!\w)")
    for bullet in bullets:
        if number.search(re.sub(r"`[^`]*`|\([^)]*\)", "", bullet)):
            assert figures.INLINE.search(bullet), bullet[:80]


def _tree(tmp_path: Path, doc: str, data: dict, table: str = "| a |\n") -> Path:
    (tmp_path / "docs" / "results").mkdir(parents=True)
    (tmp_path / "docs" / "results" / "r.json").write_text(json.dumps(data))
    (tmp_path / "docs" / "results" / "t.md").write_text(table)
    (tmp_path / "README.md").write_text(doc)
    return tmp_path


def test_a_typed_value_that_differs_is_found(tmp_path):
    doc = "speed <!--fig docs/results/r.json#runs.1.x:.2f-->1.50<!--/fig--> x\n"
    root = _tree(tmp_path, doc, {"runs": [{"x": 0}, {"x": 1.499}]})
    assert figures.problems(root) == []
    root = _tree(tmp_path / "b", doc, {"runs": [{"x": 0}, {"x": 1.7}]})
    (bad,) = figures.problems(root)
    assert "README.md:1" in bad and "1.70" in bad


def test_an_included_table_that_differs_is_found(tmp_path):
    doc = "<!--include docs/results/t.md-->\n| a |\n<!--/include-->\n"
    assert figures.problems(_tree(tmp_path, doc, {})) == []
    root = _tree(tmp_path / "b", doc, {}, table="| b |\n")
    assert len(figures.problems(root)) == 1
    assert figures.render(doc, root) == "<!--include docs/results/t.md-->\n| b |\n<!--/include-->\n"


def test_a_missing_source_or_key_is_a_problem(tmp_path):
    root = _tree(tmp_path, "<!--fig docs/results/r.json#nope-->1<!--/fig-->\n"
                           "<!--fig docs/results/gone.json#a-->1<!--/fig-->\n", {"a": 1})
    assert len(figures.problems(root)) == 2
