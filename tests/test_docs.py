"""The Python examples in README.md and docs/*.md run as pasted."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [p for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))] if "```python" in p.read_text()]


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_python_snippets_run(path):
    blocks = re.findall(r"```python\n(.*?)```", path.read_text(), re.S)
    namespace: dict = {}
    exec(compile("\n".join(blocks), str(path), "exec"), namespace)  # noqa: S102 - our own docs
