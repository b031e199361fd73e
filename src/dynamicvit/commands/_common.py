"""Argument types shared by the commands (argparse `type=` callables: a bad value is a usage error)."""
from __future__ import annotations

import argparse
import ast
import json
import math


def float_list(text: str) -> list[float]:
    """`0.5,0.7,1` -> [0.5, 0.7, 1.0]; at least one number."""
    try:
        values = [float(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, e.g. 1.0,0.7; got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one number, e.g. 1.0,0.7; got {text!r}")
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected finite numbers; got {text!r}")
    return values


def positive_float_list(text: str) -> list[float]:
    """Like `float_list`, every value > 0 (e.g. a normalization std: it divides)."""
    values = float_list(text)
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected numbers greater than 0; got {text!r}")
    return values


def int_list(text: str) -> list[int]:
    """`3,6,9` -> [3, 6, 9]; at least one integer."""
    try:
        values = [int(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, e.g. 3,6,9; got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one integer, e.g. 3,6,9; got {text!r}")
    return values


def positive_int_list(text: str) -> list[int]:
    """Like `int_list`, every value >= 1 (e.g. batch sizes)."""
    values = int_list(text)
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected integers of at least 1; got {text!r}")
    return values


def positive_int(text: str) -> int:
    """An integer >= 1 (a size or a count that cannot be zero)."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer of at least 1; got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0 (e.g. data loader workers, where 0 means the main process)."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer of at least 0; got {text!r}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer; got {text!r}") from None


def positive_float(text: str) -> float:
    """A finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number; got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a number greater than 0; got {text!r}")
    return value


def json_text(obj) -> str:
    """Valid JSON always: NaN and infinities (not JSON) become null."""
    return json.dumps(_finite(obj), indent=2, allow_nan=False)


def _finite(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


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
