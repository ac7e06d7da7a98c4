"""Mutated manifests for the reader tests (tests/test_cpp_runtime.py): the same mutants go to the
Python reader (runtime.artifact.manifest.load_manifest) and the C++ one (ditrt_open), whose accept/refuse
decisions must agree, and to the C++ reader under AddressSanitizer and UBSan.

A mutant is a valid manifest (DiT: schema 3 with and without a decoder, schema 2, schema 1; SiT:
schema 3 with and without a decoder) with one to
three edits of its JSON tree: a field removed, renamed or replaced by a value from a pool of
plausible and hostile values (wrong types, bounds and one past them, 2^31, 2^32, 2^64, 10^30, NaN,
+-inf, 1e39, paths out of the artifact, ...), a number nudged, a list element dropped, repeated or
swapped, an unknown key added; or one edit of its text (truncated, a byte flipped, garbage
inserted, a byte order mark, deep nesting, literals Python's json accepts beyond RFC 8259). Each
mutant is a pure function of (seed, index): the same list on every run.
"""
from __future__ import annotations

import copy
import json
import math
import random
import re

POOL = [None, True, False, 0, -1, 1, 2, 3, 4, 7, 8, 10, 11, 64, 65, 999, 1000, 1001, 100_000, 100_001, 2**16, 2**16 + 1,
        2**20, 2**20 + 1, 2**30, 2**30 + 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64, 10**30, -(10**30), 1e6, 1e15, 1e39, -1e39,
        1e300, 0.0, -0.0, 0.5, 1.0, 4.0, 8.0, 1e-4, 0.02, 0.999, 1.5, math.nan, math.inf, -math.inf, "", "x", "batch", "dit",
        "sit", "ddpm", "ddim", "dpm++2m", "sde-euler", "sde-heun", "ode-dopri5", "ode-euler", "Linear", "GVP", "score", "official", "standard", "linear", "cosine", "epsilon", "velocity",
        "learned_range", "fixed_large", "class", "text", "fp32", "fp16", "int8", "float32", "int64", "float16", "latent",
        "time", "condition", "prediction", "image", "rows", "images", "../x.onnx", "/etc/passwd", "a\\b.onnx", "sub/./x.onnx",
        ".", "denoiser.fp32.onnx", "decoder.fp32.onnx", "0" * 64, "0" * 63, "é" * 64, "250", "ddim50", "ddim300", "25", "-5",
        "10,20,30", "nul\0l", [], {}, [1], ["batch"], ["batch", 4, 8, 8], {"a": 1}, {"kind": "class"}, [None], [{}]]

EXTRA_KEYS = ["extra", "eta", "seed", "null_class", "guided_channels", "family", "role", "condition", "files", "bytes",
              "scaling_factor", "batch_axis", "prediction", "clip_denoised", "upgraded_from_schema", "schema_version",
              "id2label", "01", "10", "transport", "diffusion", "path_type", "train_eps", "sample_eps", "atol"]


def _paths(node, prefix=()):
    """Every (path, value) in the tree, the root excluded."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield prefix + (k,), v
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield prefix + (i,), v
            yield from _paths(v, prefix + (i,))


def _parent(root, path):
    node = root
    for p in path[:-1]:
        node = node[p]
    return node


def _nudge(value, rng):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return rng.choice([value + 1, value - 1, -value, 2 * value, value * 2**20, 0])
    if isinstance(value, float):
        return rng.choice([value * 10, value / 10, -value, value + 1, 0.0, float(int(value)) if math.isfinite(value) else 0.0])
    if isinstance(value, str):
        return rng.choice([value + "x", value[:-1], value.upper(), " " + value, value + "/", "./" + value, value * 2])
    return rng.choice(POOL)


def mutate_tree(data, rng: random.Random):
    data = copy.deepcopy(data)
    for _ in range(rng.choice([1, 1, 1, 2, 2, 3])):
        paths = list(_paths(data))
        if not paths:
            break
        path, value = rng.choice(paths)
        parent, key = _parent(data, path), path[-1]
        op = rng.random()
        if op < 0.15:  # remove
            del parent[key]
        elif op < 0.5:  # replace from the pool
            parent[key] = copy.deepcopy(rng.choice(POOL))
        elif op < 0.7:  # nudge
            parent[key] = _nudge(value, rng)
        elif op < 0.78 and isinstance(parent, dict):  # rename
            parent[rng.choice(EXTRA_KEYS) if rng.random() < 0.5 else key + "_"] = parent.pop(key)
        elif op < 0.86 and isinstance(value, dict):  # an unknown or misplaced key
            value[rng.choice(EXTRA_KEYS)] = copy.deepcopy(rng.choice(POOL))
        elif isinstance(value, list) and value:  # list edits
            i, j = rng.randrange(len(value)), rng.randrange(len(value))
            edit = rng.choice(["drop", "repeat", "swap"])
            if edit == "drop":
                del value[i]
            elif edit == "repeat":
                value.insert(i, copy.deepcopy(value[j]))
            else:
                value[i], value[j] = value[j], value[i]
        else:
            parent[key] = copy.deepcopy(rng.choice(POOL))
    return data


def mutate_text(text: str, rng: random.Random) -> bytes:
    raw = text.encode()
    op = rng.randrange(9)
    if op == 0:
        return raw[:rng.randrange(len(raw))]
    if op == 1:
        i = rng.randrange(len(raw))
        return raw[:i] + bytes([raw[i] ^ (1 << rng.randrange(8))]) + raw[i + 1:]
    if op == 2:
        i = rng.randrange(len(raw))
        return raw[:i] + rng.choice([b"\x00", b"\xff\xfe", b"\xc3(", b"\\u", b",", b"}", b"NaN", b"1e999", b"\xed\xa0\x80"]) + raw[i:]
    if op == 3:
        return b"\xef\xbb\xbf" + raw
    if op == 4:
        depth = rng.choice([10, 100, 700, 5000, 100_000])
        return raw[:-1] + b', "deep": ' + b"[" * depth + b"]" * depth + b"}"
    if op == 5:
        literal = rng.choice([b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e400", b"123456789012345678901234567890",
                              b"-0", b"1E5", b'"\\ud800"', b'"\\udc00x"', b"9" * 5000])
        return raw[:-1] + b', "created_utc": ' + literal + b"}"
    if op == 6:
        return raw + rng.choice([b" ", b"\n", b" x", b"{}", b"\x00"])
    if op == 7:
        return rng.choice([b"", b"null", b"[]", b"{}", b'"ditrt.manifest"', b"3", b"{" * 3])
    dup = b', "schema_version": ' + rng.choice([b"3", b"2", b"1", b"4", b'"3"', b"3.0", b"true"])
    return raw[:-1] + dup + b"}"


def sit_from_dit(data: dict) -> dict:
    """A DiT schema 3 manifest as `ditrt export --family sit` writes it for the same backbone: the
    transport instead of the diffusion, the velocity half of the channels, SiT's defaults."""
    d = copy.deepcopy(data)
    d["model"]["family"] = "sit"
    d["model"]["out_channels"] = d["model"]["in_channels"]
    d.pop("diffusion")
    d["transport"] = {"path_type": "Linear", "prediction": "velocity", "train_eps": 0.0, "sample_eps": 0.0}
    for name in ("denoiser", "final"):  # the monolithic graph and its last segment (feature caching)
        if name in d["networks"]:
            d["networks"][name]["outputs"][0]["shape"][1] = d["model"]["in_channels"]
    d["defaults"] = {"sampler": "sde-euler", "steps": 250, "cfg_scale": 1.5, "guidance": "official"}
    return d


def bases(schema3: dict, schema3_decoder: dict, schema1: dict) -> list[dict]:
    """Valid manifests of every schema and both families, trimmed of the bulky fields no reader
    checks (validation records), so that most edits land on fields a reader does check."""
    def trim(d):
        d = copy.deepcopy(d)
        for net in d.get("networks", {}).values():
            for graph in net.get("graphs", {}).values():
                graph.pop("validation", None)
        for graph in d.get("graphs", {}).values():
            graph.pop("validation", None)
        return d
    out = [trim(schema3), trim(schema3_decoder), trim(schema1), downgrade_to_schema_2(trim(schema3_decoder))]
    with_eta = trim(schema3)
    with_eta["defaults"] = {"sampler": "ddim", "steps": "ddim50", "cfg_scale": 1.5, "guidance": "standard", "eta": 0.5}
    with_labels = trim(schema3_decoder)  # class names (runtime/artifact/labels.py read_id2label; C++ read_labels)
    with_labels["id2label"] = {"0": "tench, Tinca tinca", "1": "goldfish", "3": "crane", "9": "crane, derrick"}
    sit_dopri5 = sit_from_dit(trim(schema3))
    sit_dopri5["defaults"] = {"sampler": "ode-dopri5", "steps": "50", "guidance": "standard"}
    sit_dopri5["diffusion"] = trim(schema3)["diffusion"]  # the other family's process section: not read
    return out + [with_eta, with_labels, with_int8(trim(schema3)), sit_from_dit(trim(schema3)),
                  sit_from_dit(trim(schema3_decoder)), sit_dopri5]


def with_int8(data: dict) -> dict:
    """A manifest with an int8 denoiser graph and its recipe (the fields both readers check, as
    exporter/quantize.py writes them); the graph entry borrows the fp32 graph's files."""
    graphs = data["networks"]["denoiser"]["graphs"]
    graphs["int8"] = {**copy.deepcopy(graphs["fp32"]), "compute_dtype": "int8", "quantization": {
        "tool": "nvidia-modelopt", "modelopt_version": "0.47.0", "config": "INT8_DEFAULT_CFG", "precision": "int8",
        "calibration": {"sampler": "ddpm", "steps": 25, "images": 64, "seed": 0, "cfg_scale": 4.0},
        "excluded_layers": ["*adaLN_modulation*", "*final_layer*"]}}
    return data


def downgrade_to_schema_2(data: dict) -> dict:
    """A schema 3 manifest as ditrt 0.2 wrote it: no family, no roles, guidance in the diffusion."""
    d = copy.deepcopy(data)
    d["schema_version"] = 2
    d["model"].pop("family")
    d["diffusion"]["null_class"] = d["model"]["num_classes"]
    d["diffusion"]["guided_channels"] = d.pop("guidance")["guided_channels"]
    for net in d["networks"].values():
        for t in net["inputs"] + net["outputs"]:
            t.pop("role", None)
            t.pop("condition", None)
    return d


def mutants(base_list: list[dict], count: int, seed: int = 0) -> list[bytes]:
    """`count` mutated manifest texts (bytes), 1 in 8 a text edit, the rest tree edits; the first
    few are the unmutated bases."""
    out = [json.dumps(b).encode() for b in base_list]
    for i in range(count - len(out)):
        rng = random.Random(f"{seed}-{i}")
        base = base_list[i % len(base_list)]
        if rng.random() < 0.125:
            out.append(mutate_text(json.dumps(base), rng))
        else:
            out.append(json.dumps(mutate_tree(base, rng)).encode())
    return out


# ---- mutants from the schema (runtime/spec/manifest_schema.json) -------------------------------------------

def _instances(node, tokens: list[str], prefix=()):
    """The paths in the tree that an object's `at` pattern names ("<...>" any key, "x[i]" any item of list x)."""
    if not tokens:
        yield prefix
        return
    token, rest = tokens[0], tokens[1:]
    if token.endswith("[i]"):
        items = node.get(token[:-3]) if isinstance(node, dict) else None
        for i, item in enumerate(items if isinstance(items, list) else []):
            yield from _instances(item, rest, prefix + (token[:-3], i))
    elif token.startswith("<"):
        for key, value in (node.items() if isinstance(node, dict) else ()):
            yield from _instances(value, rest, prefix + (key,))
    elif isinstance(node, dict) and token in node:
        yield from _instances(node[token], rest, prefix + (token,))


def object_paths(data: dict, at: str) -> list[tuple]:
    """Where the schema object with this `at` sits in a manifest (an existing object only)."""
    tokens = at.split(" (")[0].replace("<int8 / fp8>", "<precision>").split(".")
    return [p for p in _instances(data, tokens) if isinstance(_get(data, p), dict)]


def _get(data, path):
    for p in path:
        data = data[p]
    return data


def rule_values(rule: dict, model: dict) -> list:
    """Values that probe a field rule: of the wrong type, at and one past each bound, each choice,
    the refused values, null."""
    kind = rule["type"]
    bound = lambda b: model[b.split(".")[1]] if isinstance(b, str) else b
    out = [None, "x", [], {}, True]
    if kind == "int":
        low, high = bound(rule.get("min", 0)), bound(rule.get("max", 2**63))
        out += [low, low - 1, high, high + 1, float(low), str(low), 2**64]
    elif kind == "number":
        low, high = rule.get("min", 0), rule.get("max", 1e300)
        out += [low, high, low - 1e-9 if not rule.get("min_open") else low / 2, high * 1.5 + 1, math.nan, math.inf, 1e39, 1]
    elif kind == "choice":
        out += [*rule.get("values", ()), *rule.get("refused", ()), "ddim", "official", "int8", "fp8", 1]
    elif kind in ("const", "equal"):
        out += [rule["value"], 0, 0.0, False, 1, "false"]
    elif kind == "text":
        out += ["", "y", 0]
    elif kind == "int_or_text":
        out += [1, 1.5, "ddim50", -1]
    elif kind == "strings":
        out += [["a"], [1], ["a", None], "a"]
    elif kind == "map":
        out += [{"official": 1}, {"official": "1"}, {"official": 0}, {"x": model["in_channels"] + 1}, [1]]
    elif kind == "object":
        out += [{"a": 1}]
    return out


def schema_mutants(base_list: list[dict], schema: dict) -> list[tuple[bytes, str, str]]:
    """For every object of the schema in every base, every field: each probe value, the field
    removed, and an unknown key added to the object; (manifest text, the object, what was edited)."""
    out = []
    for b, base in enumerate(base_list):
        for name, spec in schema["objects"].items():
            for path in object_paths(base, spec["at"])[:1]:  # the first instance: one per object and base
                for key, rule in spec["fields"].items():
                    edits = [(key, v) for v in rule_values(rule, base.get("model", {"in_channels": 4}))] + [(key, _REMOVE)]
                    edits.append(("zz_unknown", 1))
                    for field, value in edits:
                        d = copy.deepcopy(base)
                        target = _get(d, path)
                        if value is _REMOVE:
                            target.pop(field, None)
                        else:
                            target[field] = value
                        out.append((json.dumps(d).encode(), name, f"base {b} {'.'.join(map(str, path))}.{field} = "
                                    f"{'removed' if value is _REMOVE else repr(value)}"))
    return out


_REMOVE = object()


_NAMED = re.compile(r"manifest fields? ([\w.\[\]'\"+-]+)")


def named_field(message: str) -> str | None:
    """The field a refusal names first ("manifest field model.depth must be ..." -> model.depth), or None."""
    match = _NAMED.search(message)
    return match.group(1) if match else None
