"""Class names: a model's `id2label` (as a diffusers `DiTPipeline`'s model_index.json carries it,
kept in the manifest's top-level `id2label`) and the resolution of names to class labels.

Names resolve as `DiTPipeline.get_label_ids` does: each entry's comma-separated synonyms, with
surrounding spaces stripped, name its class ("tench, Tinca tinca" gives "tench" and "Tinca tinca").
Two differences, both refusals where diffusers silently picks: a synonym shared by two classes
("crane" in ImageNet) is ambiguous, and an unknown name lists the close matches. Numbers keep
working: an item made of ASCII digits is the class label itself.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field

from ..core.errors import ArtifactError, InputError

MAX_NAME_CHARS = 4096  # an id2label entry is a few words; a longer one is not a class name


class LabelError(InputError):
    """A class name that does not resolve: unknown, ambiguous, or no names in the artifact."""


def synonyms(entry: str) -> list[str]:
    """The names of one id2label entry, as diffusers splits them (empty names dropped)."""
    return [name.strip() for name in entry.split(",") if name.strip()]


@dataclass(frozen=True)
class ClassNames:
    """id2label (class label -> its entry) and, derived from it, every synonym -> its labels."""
    id2label: dict[int, str]
    by_name: dict[str, tuple[int, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        by_name: dict[str, list[int]] = {}
        for label in sorted(self.id2label):
            for name in synonyms(self.id2label[label]):
                if label not in by_name.setdefault(name, []):
                    by_name[name].append(label)
        object.__setattr__(self, "by_name", {name: tuple(labels) for name, labels in by_name.items()})

    def label_of(self, name: str) -> int:
        """The class label a name (or a number) stands for; LabelError if unknown or ambiguous."""
        item = name.strip()
        if as_number(item) is not None:
            return as_number(item)
        labels = self.by_name.get(item)
        if labels is None:
            close = difflib.get_close_matches(item, list(self.by_name), n=5, cutoff=0.6)
            hint = f"; close matches: {', '.join(map(repr, close))}" if close else "; no close match"
            raise LabelError(f"unknown class name {item!r}{hint} (or give the class number)")
        if len(labels) > 1:
            entries = "; ".join(f"{label} ({self.id2label[label]!r})" for label in labels)
            raise LabelError(f"class name {item!r} is ambiguous: it names classes {entries}; give the class number")
        return labels[0]

    def to_manifest(self) -> dict[str, str]:
        return {str(label): self.id2label[label] for label in sorted(self.id2label)}


def resolve_labels(items, names: ClassNames | None) -> list:
    """A request's labels with each name replaced by its class label. Ints (and anything not a
    string) pass through unchanged, for the conditioning's own checks; a string of digits is a
    number; other strings need the artifact's class names."""
    out = []
    for item in items:
        if not isinstance(item, str):
            out.append(item)
        elif as_number(item) is not None:
            out.append(as_number(item))
        elif names is None:
            raise LabelError(f"class name {item.strip()!r} given, but this artifact has no class names (its "
                             "manifest has no id2label: export from a checkpoint that carries one, such as a "
                             "diffusers DiTPipeline); give class numbers")
        else:
            out.append(names.label_of(item))
    return out


_NUMBER = re.compile(r"[+-]?[0-9]+")


MAX_LABEL_DIGITS = 19  # any int64 class label


def as_number(item: str) -> int | None:
    """A class number written as ASCII digits (a sign allowed, for the range check's message)."""
    text = item.strip()
    if not _NUMBER.fullmatch(text):
        return None
    if len(text) > MAX_LABEL_DIGITS:  # before int(): Python refuses int strings over 4300 digits (ValueError)
        raise LabelError(f"class label {text[:12]}... has {len(text)} digits; class labels have at most "
                         f"{MAX_LABEL_DIGITS}")
    return int(text)


def split_labels(text: str, what: str = "--labels") -> list[str]:
    """A comma-separated command-line list of class numbers or names."""
    items = [item.strip() for item in (text or "").split(",")]
    if not items or any(not item for item in items):
        raise LabelError(f"{what} must be comma-separated class numbers or names, got {text!r}")
    return items


_CANONICAL_INT = re.compile(r"0|[1-9][0-9]*")


def read_id2label(data: dict, num_classes: int) -> ClassNames | None:
    """The manifest's optional `id2label`: an object whose keys are canonical decimal class labels
    0..num_classes-1 and whose values are non-empty strings of at most MAX_NAME_CHARS characters
    (the C++ reader applies the same rules)."""
    if "id2label" not in data:
        return None
    raw = data["id2label"]
    if not isinstance(raw, dict):
        raise ArtifactError("manifest field id2label must be an object (class label -> its names)")
    out: dict[int, str] = {}
    for key, value in raw.items():
        if not (_CANONICAL_INT.fullmatch(key) and int(key) < num_classes):
            raise ArtifactError(f"manifest field id2label key {key!r} is not a class label 0..{num_classes - 1} "
                                "(a decimal integer without leading zeros)")
        if not isinstance(value, str) or not value or len(value) > MAX_NAME_CHARS:
            raise ArtifactError(f"manifest field id2label[{key!r}] must be a non-empty string of at most "
                                f"{MAX_NAME_CHARS} characters")
        out[int(key)] = value
    return ClassNames(out)


def id2label_from_config(raw, num_classes: int, where: str, error=InputError) -> ClassNames:
    """A checkpoint's id2label (model_index.json's: string or int keys) checked like the manifest's."""
    if not isinstance(raw, dict):
        raise error(f"{where}: id2label must be an object (class label -> its names)")
    try:
        names = read_id2label({"id2label": {str(k): v for k, v in raw.items()}}, num_classes)
    except ArtifactError as e:
        raise error(f"{where}: {str(e).replace('manifest field ', '')}") from None
    return names
