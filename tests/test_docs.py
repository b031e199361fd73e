"""The documentation pages (docs/ and benchmarks/README.md): every example runs (or is parsed, or says
why not), every link resolves, and no text in the project narrates its history.

Examples follow the fence words of tests/doc_examples.py. The history check scans README.md, docs/,
the sources, benchmarks/ and scripts/ for issue numbers, commit hashes, "earlier release" and pointers
to files outside the project, and lists every offender.
"""
import re
from pathlib import Path

import pytest

from doc_examples import NOT_CODE, ROOT, RUNNABLE, check, examples, params

DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
BENCHMARKS = ROOT / "benchmarks" / "README.md"
MARKDOWN = [ROOT / "README.md", *PAGES, BENCHMARKS]


@pytest.mark.parametrize("example", params([*PAGES, BENCHMARKS]))
def test_docs_example(example, tmp_path, monkeypatch):
    check(example, tmp_path, monkeypatch)


def test_every_code_block_says_what_it_is():
    """A fence without a known language would be an example nobody runs."""
    for path in MARKDOWN:
        for ex in examples(path):
            assert ex.lang in RUNNABLE + NOT_CODE, f"{ex.where}: code block of language {ex.lang!r}; use one of {RUNNABLE + NOT_CODE}"
            assert ex.lang in RUNNABLE or ex.mode == "run", f"{ex.where}: a {ex.lang} block is never run; drop '{ex.mode}'"


def test_the_pages_exist():
    for name in ("training", "models", "spatial", "checkpoints", "deployment", "reliability", "results"):
        assert (DOCS / f"{name}.md").is_file(), f"docs/{name}.md is missing"
    assert "## predict, export and untrusted files" in (DOCS / "reliability.md").read_text()


def test_experiment_records_are_dated_and_give_their_commands():
    records = [p for p in (DOCS / "experiments").glob("*.md") if p.name != "README.md"]
    assert records
    index = (DOCS / "experiments" / "README.md").read_text()
    for record in records:
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}-[a-z0-9-]+\.md", record.name), f"{record.name}: name it YYYY-MM-DD-topic.md"
        assert any(ex.lang in RUNNABLE for ex in examples(record)), f"{record.name} gives no commands"
        assert f"({record.name})" in index, f"docs/experiments/README.md does not list {record.name}"


# -- links --------------------------------------------------------------------------------------------

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings."""
    found = set()
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return found


def test_links_resolve():
    broken = []
    for path in MARKDOWN:
        text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target):
                continue  # a web address
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            if not dest.exists():
                broken.append(f"{path.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{path.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


# -- no history in text -------------------------------------------------------------------------------

HISTORY = {
    "an issue number": re.compile(r"\bissues?\s+#?\d+\b", re.I),
    "an issue reference": re.compile(r"(?<![\w&#/:])#\d{1,5}\b"),
    "a commit hash": re.compile(r"\b(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}\b"),
    "a release history": re.compile(r"\b(?:earlier|previous|prior|last|old) (?:release|version)s?\b", re.I),
    "a file outside the project": re.compile(r"shared/reference|/work/shared"),
    "a specification outside the project": re.compile(r"\bthe spec\b|\bspec's\b", re.I),
}


def scanned_files() -> list[Path]:
    files = [ROOT / "README.md", *PAGES, *sorted((ROOT / "src").rglob("*.py"))]
    for folder in ("benchmarks", "scripts"):
        files += sorted(p for p in (ROOT / folder).iterdir() if p.is_file())
    return files


def history_hits(text: str) -> list[tuple[int, str, str, str]]:
    """(line number, what, the matched text, the line) for every line that narrates history."""
    hits = []
    for number, line in enumerate(text.splitlines(), 1):
        for what, pattern in HISTORY.items():
            match = pattern.search(line)
            if match:
                hits.append((number, what, match.group(0), line.strip()))
    return hits


def test_no_history_in_text():
    """Comments and docs say what the code does; experiment records (dated, in docs/experiments) say
    what was tried. Issue numbers, commit hashes and pointers outside the project belong in neither."""
    offenders = [f"{path.relative_to(ROOT)}:{number}: {what} ({found!r}): {line[:100]}"
                 for path in scanned_files() for number, what, found, line in history_hits(path.read_text())]
    assert not offenders, f"{len(offenders)} line(s) narrate history or point outside the project:\n" + "\n".join(offenders)


def test_the_history_check_finds_what_it_looks_for():
    sample = ("fixed in issue 12\nsee #34\ncommit b9cab82 gives\nas in an earlier release\n"
              "shared/reference/spatial.md\nthe spec's table\ncolor:#333, spec: PathLike and deadbeef are fine\n")
    assert [what for _, what, _, _ in history_hits(sample)] == [
        "an issue number", "an issue reference", "a commit hash", "a release history",
        "a file outside the project", "a specification outside the project"]
