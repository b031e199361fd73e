"""Every ```python block of README.md runs as written (extracted from the README, so the two cannot drift).

Blocks run in a fresh namespace in a temporary working folder. Blocks that export or compile a model
take a while on a CPU and are marked slow (they still run in CI).
"""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
SLOW_MARKERS = ("export", "compile(")


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def _params():
    params = []
    for i, code in enumerate(python_blocks()):
        slow = any(m in code for m in SLOW_MARKERS)
        params.append(pytest.param(code, id=f"block{i}", marks=[pytest.mark.slow] if slow else []))
    return params


def test_the_readme_has_python_examples():
    blocks = python_blocks()
    assert len(blocks) >= 3 and any("torch.export.export" in b for b in blocks)


@pytest.mark.parametrize("code", _params())
def test_readme_block_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})
