"""Argument types shared by the commands (argparse `type=` callables: a bad value is a usage error)."""
from __future__ import annotations

import argparse
import ast
import json


def float_list(text: str) -> list[float]:
    """`0.5,0.7,1` -> [0.5, 0.7, 1.0]."""
    try:
        return [float(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, e.g. 1.0,0.7; got {text!r}") from None


def int_list(text: str) -> list[int]:
    """`3,6,9` -> [3, 6, 9]."""
    try:
        return [int(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, e.g. 3,6,9; got {text!r}") from None


def model_kwargs(text: str) -> dict:
    """timm keyword arguments: a JSON object or `key=value` pairs (`in_chans=1,img_size=(32, 48)`).

    Values of key=value pairs are read as JSON, then as Python literals, else kept as strings.
    """
    text = (text or "").strip()
    if not text:
        return {}
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text}") from None
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"patch_size\": 8}}', got {text}")
        return value
    kwargs = {}
    for item in _split_top_level(text):
        key, sep, value = item.strip().partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise argparse.ArgumentTypeError(
                f"expected comma-separated KEY=VALUE pairs (e.g. in_chans=1,num_classes=10) or a JSON object; "
                f"cannot read {item.strip()!r}"
            )
        kwargs[key] = _literal(value.strip())
    return kwargs


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets, so img_size=(32, 48) stays one item."""
    items, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += ch
    return [i for i in items + [current] if i.strip()]


def _literal(value: str):
    for parse in (json.loads, ast.literal_eval):
        try:
            return parse(value)
        except (ValueError, SyntaxError):
            continue
    return value
