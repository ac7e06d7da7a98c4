"""The manifest's value rules as data: `manifest_schema.json` (shipped beside this module, compiled
into the C++ library) and its interpreter. Both readers check fields from the same file with the
same messages (runtime/cpp/src/schema.cpp is the other interpreter; tests/test_manifest_schema.py
and the differential test in tests/test_cpp_runtime.py hold them together).

The file holds what can be data: per object, its fields (type, range, choices, default, what a
missing one means) and the rules between fields (`ordered`, `needs`, `equal`). What cannot be data
stays in the readers: the sections' presence, the family and conditioning registries, tensor specs
against the model config, segment shapes, file names and sha256 maps, the degenerate-schedule
check, id2label keys, the upgrades of schemas 1 and 2.
"""
from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from ..core.errors import ArtifactError
from ..core.validate import check_choice, check_int, check_number

SCHEMA_FILE = Path(__file__).with_name("manifest_schema.json")


@lru_cache(maxsize=1)
def rules() -> dict:
    """The parsed manifest_schema.json."""
    return json.loads(SCHEMA_FILE.read_text("utf-8"))


def registry(name: str) -> dict:
    """The built-in entries of a registry as data ("families" or "samplers": the file's `registries`),
    which the C++ reader reads too."""
    return rules()["registries"][name]


@dataclass(frozen=True)
class Context:
    """What a rule refers to outside its object: `refs` (dotted names such as "model.in_channels"
    -> value), `choices` (a values_from name -> the allowed strings), `defaults` (the family's
    values for default_from fields)."""
    refs: dict = field(default_factory=dict)
    choices: dict = field(default_factory=dict)
    defaults: dict = field(default_factory=dict)


def _fail(message: str):
    raise ArtifactError(message)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _bound(value, context: Context):
    return context.refs[value] if isinstance(value, str) else value


def check_value(rule: dict, value, where: str, context: Context):
    """`value` of the field at `where` (a dotted path) under `rule`; the value (a number as checked)."""
    what = rules()["prefix"] + where
    kind = rule["type"]
    if kind == "int":
        return check_int(value, what, _bound(rule.get("min"), context), _bound(rule.get("max"), context), ArtifactError)
    if kind == "number":
        return check_number(value, what, rule.get("min"), rule.get("max"), low_open=rule.get("min_open", False),
                            error=ArtifactError, float32=rule.get("float32", False))
    if kind == "bool":
        if not isinstance(value, bool):
            _fail(f"{what} must be true or false, got {value!r}")
        return value
    if kind == "choice":
        if isinstance(value, str) and value in rule.get("refused", {}):
            _fail(f"{what} is {value!r}: {rule['refused'][value]}")
        values = rule["values"] if "values" in rule else context.choices[rule["values_from"]]
        return check_choice(value, what, values, ArtifactError)
    if kind == "const":  # the very value: a bool is no int, 0 is not false
        if type(value) is not type(rule["value"]) or value != rule["value"]:
            _fail(f"{what} is {value!r}: {rule['why']}")
        return value
    if kind == "equal":  # Python's ==: 0.0 and false equal 0
        if value != rule["value"]:
            _fail(f"{what} must be {json.dumps(rule['value'])}, got {value!r}")
        return value
    if kind == "text":
        if not isinstance(value, str) or not value:
            _fail(f"{what} must be a non-empty string, got {value!r}")
        return value
    if kind == "int_or_text":
        if not (_is_int(value) or isinstance(value, str)):
            _fail(f"{what} must be an int or a step spec string, got {value!r}")
        return value
    if kind == "strings":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            _fail(f"{what} must be a list of strings")
        return value
    if kind == "object":
        if not isinstance(value, dict):
            _fail(f"{what} must be an object")
        return check_object(rule["object"], value, where, context)
    if kind == "map":
        if not isinstance(value, dict) or not value:
            _fail(f"{what} must be a non-empty object, got {value!r}")
        return {k: check_value(rule["values"], v, f"{where}.{k}", context) for k, v in value.items()}
    raise ValueError(f"manifest_schema.json: unknown rule type {kind!r}")  # a broken schema file, not bad input


def check_object(name: str, data: dict, where: str, context: Context = Context()) -> dict:
    """The fields of `data` (an object, the `name` entry of the schema at `where`) checked in the
    schema's order, then its cross-field checks; returns field -> value with defaults filled in
    (an optional field that is absent, or null when nullable, is left out)."""
    spec = rules()["objects"][name]
    prefix = rules()["prefix"]
    if spec.get("extra") == "refuse":
        unknown = sorted(set(data) - set(spec["fields"]))
        if unknown:
            _fail(f"{prefix}{where} has unknown keys {unknown}; it takes {', '.join(spec['fields'])}")
    values = {}
    for key, rule in spec["fields"].items():
        if key not in data:
            if rule.get("missing") == "refuse":
                _fail(f"{prefix}{where}.{key} is missing")
            if rule.get("optional"):
                continue
        value = data[key] if key in data else _default(rule, key, context)
        if value is None and rule.get("nullable"):
            continue
        values[key] = check_value(rule, value, f"{where}.{key}", context)
    for check in spec.get("checks", ()):
        _cross_check(check, values, where, context)
    return values


def _default(rule: dict, key: str, context: Context):
    if "default_from" in rule:
        return context.defaults[key]
    return rule.get("default")  # None: the check refuses a missing field as it refuses null


def _cross_check(check: dict, values: dict, where: str, context: Context) -> None:
    prefix, rule = rules()["prefix"], check["rule"]
    if rule == "ordered":  # above < first <= second < below
        low, high = (values[f] for f in check["fields"])
        if not (low <= high < check["below"]):
            first, second = check["fields"]
            _fail(f"manifest fields {where}.{first} {low!r} and {second} {high!r} need {check['above']:g} < {first} "
                  f"<= {second} < {check['below']:g}")
    elif rule == "needs":  # field == value only where the referenced bool is true
        if values[check["field"]] == check["value"] and context.refs[check["needs"]] is not True:
            _fail(f"{prefix}{where}.{check['field']} is {check['value']}, but {check['needs']} is false "
                  f"({check['why']})")
    elif rule == "equal":
        have, want = values[check["field"]], values[check["to"]]
        if have != want:
            _fail(f"{prefix}{where}.{check['field']} is {have}, but it must equal {check['to']} = {want}: {check['why']}")
    else:
        raise ValueError(f"manifest_schema.json: unknown check {rule!r}")


def field_count() -> tuple[int, int]:
    """(field rules, cross-field checks) in the schema."""
    objects = rules()["objects"].values()
    return sum(len(o["fields"]) for o in objects), sum(len(o.get("checks", ())) for o in objects)


# ---- the documentation table (engines/README.md, generated) ---------------------------------------

def _describe(rule: dict) -> str:
    kind = rule["type"]
    if kind in ("int", "number"):
        low, high = rule.get("min"), rule.get("max")
        name = "int" if kind == "int" else "float32 number" if rule.get("float32") else "number"
        if low is None and high is None:
            return name
        if low is not None and high is not None and low == high:
            return f"{name} {_num(low)}"
        left = "(" if rule.get("min_open") else "["
        if high is None:
            return f"{name} {'>' if rule.get('min_open') else '>='} {_num(low)}"
        return f"{name} in {left}{_num(low)}, {_num(high)}]"
    if kind == "choice":
        return "one of " + (", ".join(f"`{v}`" for v in rule["values"]) if "values" in rule else rule["values_from"])
    if kind in ("const", "equal"):
        return f"`{json.dumps(rule['value'])}`"
    if kind == "map":
        return f"non-empty object of {_describe(rule['values'])}"
    if kind == "object":
        return f"object ({rule['object']})"
    return {"bool": "true or false", "text": "non-empty string", "int_or_text": "int or string",
            "strings": "list of strings"}[kind]


def _num(value) -> str:
    if isinstance(value, str):
        return f"`{value}`"
    if _is_int(value) and value >= 1 << 20 and (value & (value - 1)) == 0:
        return f"2^{value.bit_length() - 1}"
    return f"{value:g}" if isinstance(value, float) and math.isfinite(value) else str(value)


def _when_missing(rule: dict) -> str:
    if rule.get("missing") == "refuse":
        return "required"
    if "default_from" in rule:
        return "the family's default"
    if "default" in rule:
        return f"default `{json.dumps(rule['default'])}`"
    return "optional" if rule.get("optional") else "required"


def markdown_table() -> str:
    """The field table of engines/README.md: one row per field rule, then the cross-field checks."""
    lines = ["| field | value | when missing |", "|---|---|---|"]
    for spec in rules()["objects"].values():
        for key, rule in spec["fields"].items():
            doc = f" ({rule['doc']})" if "doc" in rule else ""
            lines.append(f"| `{spec['at']}.{key}` | {_describe(rule)}{doc} | {_when_missing(rule)} |")
        if spec.get("extra") == "refuse":
            lines.append(f"| `{spec['at']}.*` | no other key | |")
    lines.append("")
    for spec in rules()["objects"].values():
        for check in spec.get("checks", ()):
            if check["rule"] == "ordered":
                first, second = check["fields"]
                text = f"{_num(check['above'])} < `{first}` <= `{second}` < {_num(check['below'])}"
            elif check["rule"] == "needs":
                text = f"`{check['field']}` `{check['value']}` needs `{check['needs']}` true ({check['why']})"
            else:
                text = f"`{check['field']}` equals `{check['to']}` ({check['why']})"
            lines.append(f"- `{spec['at']}`: {text}")
    return "\n".join(lines) + "\n"
