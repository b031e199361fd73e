"""The code examples of the Markdown files, and how the tests run each one.

A fenced block says how it is checked in its info string: the language first (GitHub highlights by
it and ignores the rest), then optional words.

    ```python                  runs in a fresh namespace, in an empty temporary folder
    ```bash                    runs with `bash -e` in an empty temporary folder, where `dynamicvit` and
                               `python` are this checkout and benchmarks/ and scripts/ are reachable
    ```LANG slow               also marked slow (end to end: seconds to minutes on a CPU)
    ```LANG fashion-mnist      needs the Fashion-MNIST files; skipped, saying so, when they are missing
    ```bash parse-only: WHY    not run: every command is parsed by dynamicvit's own argument parser
                               (flags, choices, recipe names; `train` settings are validated too)
    ```LANG skip: WHY          not run, WHY says why; its syntax is still checked
    ```text / yaml / json      not code to run (output, layouts, equations)

Examples that need a GPU, ImageNet or a download cannot run in the tests: they are parse-only where
they are `dynamicvit` commands, and skipped with a reason otherwise.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUNNABLE = ("python", "bash")
NOT_CODE = ("text", "yaml", "json")
FENCE = re.compile(r"^```(.*)$")


@dataclass(frozen=True)
class Example:
    path: Path
    line: int  # line of the opening fence, 1-based
    lang: str
    code: str
    mode: str  # "run", "parse-only" or "skip"
    reason: Optional[str]
    slow: bool
    fashion_mnist: bool

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def parse_info(info: str) -> tuple[str, str, Optional[str], set[str]]:
    """(language, mode, reason, flags) of a fence's info string, e.g. 'bash slow parse-only: needs ImageNet'."""
    head, _, reason = info.partition(":")
    words = head.split()
    lang = words[0] if words else ""
    flags = set(words[1:])
    mode = "run"
    for name in ("parse-only", "skip"):
        if name in flags:
            flags.discard(name)
            mode = name
    if mode != "run" and not reason.strip():
        raise ValueError(f"'{info}': a {mode} block says why after a colon ('{mode}: needs ImageNet')")
    if mode == "run" and reason:
        raise ValueError(f"'{info}': only skip and parse-only blocks take a reason")
    return lang, mode, reason.strip() or None, flags


def examples(path: Path) -> list[Example]:
    """Every fenced block of a Markdown file."""
    found, lines, i = [], path.read_text().splitlines(), 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        start, info = i, opening.group(1).strip()
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            i += 1
        if i == len(lines):
            raise ValueError(f"{path}:{start + 1}: the code block is not closed")
        lang, mode, reason, flags = parse_info(info)
        unknown = flags - {"slow", "fashion-mnist"}
        if unknown:
            raise ValueError(f"{path}:{start + 1}: unknown word(s) {sorted(unknown)} in '{info}'")
        code = "\n".join(lines[start + 1 : i]) + "\n"
        found.append(Example(path, start + 1, lang, code, mode, reason, "slow" in flags, "fashion-mnist" in flags))
        i += 1
    return found


def params(paths: list[Path]) -> list:
    """pytest parameters for the runnable and parse-only examples of `paths`, marked slow where they say so."""
    out = []
    for path in paths:
        for ex in examples(path):
            if ex.lang in RUNNABLE:
                marks = [pytest.mark.slow] if ex.slow else []
                out.append(pytest.param(ex, id=ex.where, marks=marks))
    return out


# -- running ----------------------------------------------------------------------------------------


def check(example: Example, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run, parse or syntax-check one example as its fence says; skip with the reason it gives."""
    if example.mode == "skip":
        syntax_check(example)
        pytest.skip(f"{example.where}: {example.reason}")
    if example.mode == "parse-only":
        parse_commands(example)
        return
    if example.fashion_mnist:
        from conftest import require_fashion_mnist

        require_fashion_mnist()
    if example.lang == "python":
        run_python(example, tmp_path, monkeypatch)
    else:
        run_bash(example, tmp_path)


def syntax_check(example: Example) -> None:
    if example.lang == "python":
        compile(example.code, example.where, "exec")
    else:
        result = subprocess.run(["bash", "-n", "-c", example.code], capture_output=True, text=True)
        assert result.returncode == 0, f"{example.where}: not valid bash: {result.stderr}"


def run_python(example: Example, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    # Padding keeps the Markdown's line numbers in tracebacks.
    code = compile("\n" * example.line + example.code, str(example.path), "exec")
    exec(code, {"__name__": "__doc_example__"})


def run_bash(example: Example, tmp_path: Path) -> None:
    bin_dir = tmp_path / ".bin"
    bin_dir.mkdir()
    for name, command in {"dynamicvit": f'"{sys.executable}" -m dynamicvit', "python": f'"{sys.executable}"',
                          "python3": f'"{sys.executable}"'}.items():
        shim = bin_dir / name
        shim.write_text(f"#!/usr/bin/env bash\nexec {command} \"$@\"\n")
        shim.chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    for folder in ("benchmarks", "scripts"):
        (work / folder).symlink_to(ROOT / folder)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1", "DYNAMICVIT_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(["bash", "-e", "-c", example.code], cwd=work, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, (
        f"{example.where} exited with {result.returncode}\n--- stdout\n{result.stdout[-3000:]}\n"
        f"--- stderr\n{result.stderr[-3000:]}"
    )


# -- parse-only ---------------------------------------------------------------------------------------


def commands(code: str) -> list[list[str]]:
    """The command lines of a shell block as argument lists (continuations joined, comments dropped)."""
    joined = re.sub(r"\\\n", " ", code)
    return [argv for line in joined.splitlines() if (argv := shlex.split(line, comments=True))]


def dynamicvit_argv(argv: list[str]) -> Optional[list[str]]:
    """The arguments after `dynamicvit` in `dynamicvit ...`, `python -m dynamicvit ...` or
    `torchrun ... -m dynamicvit ...`; None for any other command."""
    if argv[0] == "dynamicvit":
        return argv[1:]
    if argv[0] in ("python", "python3", "torchrun") and "-m" in argv:
        at = argv.index("-m")
        if at + 1 < len(argv) and argv[at + 1] in ("dynamicvit", "dynamicvit.cli"):
            return argv[at + 2 :]
    return None


def parse_commands(example: Example) -> None:
    """Parse every command of a parse-only block with the command's own parser; fail on the first error."""
    lines = commands(example.code)
    assert lines, f"{example.where}: a parse-only block without commands"
    for argv in lines:
        args = dynamicvit_argv(argv)
        assert args is not None, (
            f"{example.where}: `{shlex.join(argv)}` is not a dynamicvit command; parse-only blocks hold "
            "dynamicvit commands only (mark others 'skip: WHY')"
        )
        parse_dynamicvit(args, where=f"{example.where}: `{shlex.join(argv)}`")


def parse_dynamicvit(args: list[str], where: str) -> argparse.Namespace:
    from dynamicvit import cli

    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
            top, rest = cli.build_parser().parse_known_args(args)
            assert top.command, "no command"
            module = importlib.import_module(f"dynamicvit.commands.{top.command}")
            parser = argparse.ArgumentParser(prog=f"dynamicvit {top.command}")
            module.add_arguments(parser)
            parsed = parser.parse_args(rest)
    except SystemExit as e:
        raise AssertionError(f"{where} does not parse (exit {e.code}): {errors.getvalue().strip()}") from None
    if top.command == "train" and getattr(parsed, "config", None) is None:
        # The settings a run would start with; a --config file named in an example is not there to read.
        module.config_from_args(parsed)
    return parsed
