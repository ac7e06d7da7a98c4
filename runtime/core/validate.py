"""The one place that checks values from callers, files and manifests: integers in a range, finite
numbers in a range, choices, arrays of numbers. Each raises the given error kind (InputError by default,
ArtifactError for manifest fields) with a message naming what was checked and what was given.

bool is refused where a number is wanted (True is an int in Python, never a meaningful count).
"""
from __future__ import annotations

import math
import numbers
from typing import Iterable

import numpy as np

from .errors import InputError


MAX_COUNT_DIGITS = 12  # a count written in decimal (steps, section sizes): more digits is no count


def check_int(value, what: str, low: int | None = 1, high: int | None = None, error=InputError, unit: str = "") -> int:
    """`value` as an int in [low, high] (None: unbounded). An int-valued string is not an int."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Integral, np.integer)):
        raise error(f"{what} must be {_integers(low, high)}{unit}, got {shown(value)}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise error(f"{what} must be {_integers(low, high)}{unit}, got {shown(value)}")
    return value


def parse_count(text: str, what: str, error=InputError, max_digits: int = MAX_COUNT_DIGITS) -> int | None:
    """`text` (spaces and tabs around it allowed) as a non-negative int when it is ASCII digits; None
    when it is not digits at all. The length is checked before the conversion: a spec of thousands
    of digits is a clear error, never Python's int-string limit (ValueError past 4300 digits)."""
    stripped = text.strip(" \t")
    if not stripped or not stripped.isascii() or not stripped.isdigit():  # "²".isdigit() is True: ASCII first
        return None
    if len(stripped) > max_digits:
        raise error(f"{what} has {len(stripped)} digits; a count has at most {max_digits}")
    return int(stripped)


def shown(value, limit: int = 80) -> str:
    """`value` for a message, short: a huge int by its size (str() of one past 4300 digits raises),
    anything else by its repr cut to `limit` characters."""
    if isinstance(value, (numbers.Integral, np.integer)) and not isinstance(value, (bool, np.bool_)) \
            and abs(int(value)).bit_length() > 200:
        return f"an integer of about {int(abs(int(value)).bit_length() * 0.30103) + 1} digits"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def check_number(value, what: str, low: float | None = None, high: float | None = None, *, low_open: bool = False,
                 error=InputError, float32: bool = False) -> float:
    """`value` as a finite float in [low, high] ((low, high] with low_open). float32=True also
    requires it finite once rounded to float32 (1e39 is a finite double but inf in float32)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
        raise error(f"{what} must be a number{_range(low, high, low_open)}, got {value!r}")
    try:
        number = float(value)
    except OverflowError:  # an int beyond the float range, 10**400 say
        raise error(f"{what} must be a finite number{_range(low, high, low_open)}, got a value beyond the "
                    f"float range") from None
    if not math.isfinite(number) or (float32 and not np.isfinite(_as_float32(number))):
        kind = "finite float32" if float32 else "finite"
        raise error(f"{what} must be a {kind} number{_range(low, high, low_open)}, got {value!r}")
    if (low is not None and (number <= low if low_open else number < low)) or (high is not None and number > high):
        raise error(f"{what} must be a number{_range(low, high, low_open)}, got {value!r}")
    return number


def check_choice(value, what: str, choices: Iterable[str], error=InputError) -> str:
    """`value` when it is one of `choices` (strings; a list or dict is never one)."""
    choices = list(choices)
    if not isinstance(value, str) or value not in choices:
        raise error(f"{what} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_array(value, what: str, error=InputError) -> np.ndarray:
    """`value` as a numpy array of real numbers (float or int: never strings, objects, bools or
    complex), not yet cast."""
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as e:  # ragged nesting, objects numpy cannot take
        raise error(f"{what} is not an array ({e})") from None
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise error(f"{what} must be a float array, got {array.dtype}")
    return array


def _integers(low, high) -> str:
    base = {1: "a positive integer", 0: "a non-negative integer", None: "an integer"}.get(low, f"an integer >= {low}")
    if high is None:
        return base
    if high >= 2**31 and (high + 1) & high == 0:  # 2**k - 1: a word size
        return f"{base} below 2^{high.bit_length()}"
    return f"an integer from {low} to {high}" if low is not None else f"an integer <= {high}"


def _range(low, high, low_open: bool = False) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low:g}, {high:g}]"
    if low is not None:
        return " > 0" if (low == 0 and low_open) else f" >= {low:g}" if not low_open else f" > {low:g}"
    if high is not None:
        return f" <= {high:g}"
    return ""


def _as_float32(number: float) -> np.float32:
    with np.errstate(over="ignore"):  # the overflow is the answer (inf), not a warning
        return np.float32(number)
