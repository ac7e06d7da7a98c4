"""Names and versions of GPUs and TensorRT releases: compute capabilities ("9.0", (9, 0), "sm90")
and TensorRT version strings ("11.4.0.106"), parsed strictly."""
from __future__ import annotations

import re

from ..core.errors import InputError

SM_NAME = re.compile(r"^sm(\d+)(\d)$")

VERSION = re.compile(r"^\d+(\.\d+){1,3}$")

def parse_compute_capability(cc) -> tuple[int, int]:
    """(major, minor) from (9, 0), "9.0" or "sm90"."""
    if isinstance(cc, (tuple, list)) and len(cc) == 2 and all(isinstance(v, int) and v >= 0 for v in cc):
        return int(cc[0]), int(cc[1])
    if isinstance(cc, str):
        if m := re.fullmatch(r"(\d+)\.(\d+)", cc.strip()):
            return int(m[1]), int(m[2])
        if m := SM_NAME.match(cc.strip()):
            return int(m[1]), int(m[2])
    raise InputError(f"not a compute capability: {cc!r} (expected e.g. '9.0', (9, 0) or 'sm90')")

def sm_name(cc) -> str:
    major, minor = parse_compute_capability(cc)
    return f"sm{major}{minor}"

def cc_string(cc) -> str:
    return "{}.{}".format(*parse_compute_capability(cc))

def parse_version(version: str) -> tuple[int, ...]:
    """TensorRT version "11.4.0.106" -> (11, 4, 0, 106); missing trailing parts count as 0."""
    if not isinstance(version, str) or not VERSION.match(version.strip()):
        raise InputError(f"not a TensorRT version: {version!r} (expected e.g. '11.4.0.106')")
    parts = tuple(int(p) for p in version.strip().split("."))
    return parts + (0,) * (4 - len(parts))
