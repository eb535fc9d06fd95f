"""Every ```python block in the tutorials (docs/tutorials/) runs, page by page, in order, as one
script per page. (Guide pages elsewhere under docs/ may show fragments that need a server or a
downloaded model; they are not run.)

A block that cannot run on its own (a fragment) is preceded by the line ``<!-- no-run -->``; such
blocks are listed here and kept few. Pages run on the real all-MiniLM-L6-v2 and tiny models built from
configs, in a temporary working folder with a private ``$ADAPTERKIT_HOME``.
"""

from __future__ import annotations

import pathlib

import pytest

DOCS = pathlib.Path(__file__).resolve().parents[2] / "docs"
NO_RUN = "<!-- no-run -->"
SLOW_PAGES = {"tutorials/train.md"}  # trains a real model for two epochs


def python_blocks(page: pathlib.Path) -> list[tuple[int, str, bool]]:
    """(line of the opening fence, code, runs) of each ```python block of ``page``."""
    lines = page.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].startswith("```python"):
            runs = not (i > 0 and lines[i - 1].strip() == NO_RUN)
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
            assert end is not None, f"{page}:{i + 1}: unclosed ```python block"
            blocks.append((i + 1, "".join(line + "\n" for line in lines[i + 1 : end]), runs))
            i = end
        i += 1
    return blocks


def pages() -> list[pathlib.Path]:
    return sorted(p for p in (DOCS / "tutorials").glob("*.md") if any(runs for _, _, runs in python_blocks(p)))


def test_block_extraction_sees_fences_and_markers(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# t\n\n```python\nx = 1\n```\n\ntext\n<!-- no-run -->\n```python\nundefined()\n```\n"
                    "```bash\nnot python\n```\n")
    assert python_blocks(page) == [(3, "x = 1\n", True), (9, "undefined()\n", False)]


def test_the_tutorials_have_code_and_few_fragments():
    tutorials = sorted((DOCS / "tutorials").glob("*.md"))
    assert {p.stem for p in tutorials} >= {"quickstart", "train", "mixed-batches", "hub", "serve"}
    for page in tutorials:
        blocks = python_blocks(page)
        assert blocks and all(runs for _, _, runs in blocks), f"{page.name}: every block must run"
    fragments = [(p.relative_to(DOCS), line) for p in DOCS.rglob("*.md") for line, _, runs in python_blocks(p)
                 if not runs]
    assert len(fragments) <= 3, f"too many {NO_RUN} blocks: {fragments}"


@pytest.mark.parametrize(
    "page",
    [
        pytest.param(p, id=str(p.relative_to(DOCS)),
                     marks=[pytest.mark.slow] if str(p.relative_to(DOCS)) in SLOW_PAGES else [])
        for p in pages()
    ],
)
def test_page_runs(page, tmp_path, monkeypatch, minilm_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ADAPTERKIT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ADAPTERKIT_REGISTRY", raising=False)
    namespace: dict = {"__name__": "__docs__"}
    for line, code, runs in python_blocks(page):
        if runs:
            # Padding with as many blank lines as precede the code makes tracebacks cite the page's lines.
            exec(compile("\n" * line + code, str(page), "exec"), namespace)
