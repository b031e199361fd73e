"""Every example of README.md runs as written (extracted from the README, so the two cannot drift).

Each ```python and ```bash block runs in a fresh temporary folder; blocks that need a GPU, ImageNet or a
download are parsed instead or skipped with their reason (see tests/doc_examples.py for the fence words).
"""
import pytest

from doc_examples import ROOT, check, examples, params

README = ROOT / "README.md"
MAX_LINES = 250  # a user guide; the rest belongs in docs/


def test_the_set_up_commands_come_first():
    first = examples(README)[0]
    assert first.lang == "bash"
    assert [line.split("#")[0].strip() for line in first.code.splitlines()] == ["bash scripts/demo.sh", "bash scripts/test.sh"]


def test_the_readme_is_a_guide_not_a_notebook():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/ (at most {MAX_LINES})"
    headings = [line for line in lines if line.startswith("## ")]
    for wanted in ("## Install", "## Quickstart", "## Prune your own ViT on ImageNet", "## Commands", "## Documentation"):
        assert wanted in headings


def test_the_readme_has_runnable_examples():
    runnable = [ex for ex in examples(README) if ex.lang in ("python", "bash") and ex.mode == "run"]
    assert any(ex.lang == "python" and "create_model" in ex.code for ex in runnable)
    assert any(ex.lang == "bash" and "dynamicvit" in ex.code for ex in runnable)


@pytest.mark.parametrize("example", params([README]))
def test_readme_example(example, tmp_path, monkeypatch):
    check(example, tmp_path, monkeypatch)
