"""TensorRT compatibility lint for ONNX graphs: every op must be one the TensorRT ONNX parser
supports, at an opset it parses. The op list is data (data/trt_onnx_ops.json, source named in it)."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import onnx

OPS_FILE = Path(__file__).parent / "data" / "trt_onnx_ops.json"
DEFAULT_TRT_MAJOR = "11"
# Ops in TensorRT's own domain that the parser imports natively (onnx-tensorrt
# builtin_op_importers.cpp): ModelOpt writes fp8 QDQ as these.
PARSER_DOMAIN_OPS = {"trt::TRT_FP8QuantizeLinear", "trt::TRT_FP8DequantizeLinear"}


@lru_cache(maxsize=1)
def trt_op_table() -> dict:
    return json.loads(OPS_FILE.read_text())


@dataclass
class LintResult:
    trt_version: str
    opset: int
    op_counts: dict[str, int]
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"ok": self.ok, "trt_version": self.trt_version, "opset": self.opset,
                "op_counts": self.op_counts, "problems": self.problems, "op_list_source": trt_op_table()["source"]}


def lint_model(model: onnx.ModelProto, trt_major: str = DEFAULT_TRT_MAJOR) -> LintResult:
    """Check op types (main graph and subgraphs), domains and the default-domain opset."""
    table = trt_op_table()
    if trt_major not in table["trt_versions"]:
        raise ValueError(f"no op table for TensorRT {trt_major}; known: {', '.join(table['trt_versions'])}")
    supported = set(table["supported"])
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    counts = Counter()
    problems = []
    for node in _all_nodes(model.graph):
        counts[node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"] += 1
    for op, n in sorted(counts.items()):
        if op in PARSER_DOMAIN_OPS:
            continue
        if "::" in op:
            problems.append(f"op {op} ({n} nodes) is in a custom domain, which the TensorRT parser cannot "
                            "parse without a plugin")
        elif op not in supported:
            why = "marked unsupported" if op in table["unsupported"] else "not listed"
            problems.append(f"op {op} ({n} nodes) is {why} in the TensorRT ONNX parser's operator table")
    limits = table["trt_versions"][trt_major]
    if not limits["min_opset"] <= opset <= limits["max_opset"]:
        problems.append(f"opset {opset} is outside TensorRT {trt_major}'s parser range "
                        f"{limits['min_opset']}..{limits['max_opset']}")
    return LintResult(trt_major, opset, dict(sorted(counts.items())), problems)


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_nodes(g)
