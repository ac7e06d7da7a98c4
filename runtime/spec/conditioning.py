"""Conditioning kinds: what a denoiser's condition input means, how a request's values become its
rows, and what the null (unconditional) rows hold for classifier-free guidance.

The denoiser's spec names the kind of each condition input (manifest:
`networks.denoiser.inputs[i].condition`, e.g. {"kind": "class", "num_classes": 1000, "null": 1000}),
and the pipeline, the batcher, the server and the C++ runtime read it from there. One registry,
`CONDITIONINGS`: a new kind (a text encoder's embeddings, say) is one class here with the same
methods, and its network.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..core.errors import ArtifactError, InputError
from .schema import check_object


class Conditioning(Protocol):
    kind: str

    def check(self, values) -> np.ndarray: ...  # a request's values -> its rows (InputError if unusable)

    def null_rows(self, n: int) -> np.ndarray: ...  # the unconditional rows for n images

    def examples(self, batch: int) -> np.ndarray: ...  # deterministic valid rows, the null value included

    def to_manifest(self) -> dict: ...


@dataclass(frozen=True)
class ClassLabels:
    """Class-conditional: an int64 label per row, 0..num_classes-1; `null` is the unconditional class
    (DiT's label embedding has num_classes + 1 rows, the last one learnt by dropping labels)."""
    num_classes: int
    null: int
    kind: str = "class"

    def check(self, values) -> np.ndarray:
        try:
            labels = np.asarray(values)
        except (ValueError, TypeError) as e:
            raise InputError(f"class_labels must be a non-empty 1-D sequence of ints ({e})") from None
        if labels.ndim != 1 or labels.size == 0:
            raise InputError(f"class_labels must be a non-empty 1-D sequence of ints, got shape {labels.shape}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise InputError(f"class_labels must be integers, got {labels.dtype}")
        bad = labels[(labels < 0) | (labels >= self.num_classes)]
        if bad.size:
            shown = sorted(set(bad.tolist()))
            raise InputError(f"class labels {shown[:10]}{' ...' if len(shown) > 10 else ''} out of range: this model "
                             f"has classes 0..{self.num_classes - 1} (the null class {self.null} is added by guidance)")
        return labels.astype(np.int64)

    def null_rows(self, n: int) -> np.ndarray:
        return np.full(n, self.null, dtype=np.int64)

    def examples(self, batch: int) -> np.ndarray:
        """Labels spread over the classes with the null class on odd rows (and on the last of several)."""
        labels = np.array([self.null if i % 2 else (37 * i) % self.num_classes for i in range(batch)], dtype=np.int64)
        if batch > 1:
            labels[-1] = self.null
        return labels

    def to_manifest(self) -> dict:
        return {"kind": self.kind, "num_classes": self.num_classes, "null": self.null}

    @classmethod
    def from_manifest(cls, data: dict, where: str) -> "ClassLabels":
        values = check_object("condition", data, where)  # manifest_schema.json: ranges, null == num_classes
        k, null = values["num_classes"], values["null"]
        return cls(k, null)


CONDITIONINGS: dict[str, type] = {"class": ClassLabels}


def read_condition(data, where: str) -> Conditioning:
    if not isinstance(data, dict) or not isinstance(data.get("kind"), str) or data["kind"] not in CONDITIONINGS:
        kind = data.get("kind") if isinstance(data, dict) else data
        raise ArtifactError(f"manifest field {where}.kind is {kind!r}; this runtime knows the conditioning kinds "
                            f"{', '.join(CONDITIONINGS)}")
    return CONDITIONINGS[data["kind"]].from_manifest(data, where)
