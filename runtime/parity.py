"""Numerical comparison of outputs against a reference: the metrics ditrt reports everywhere."""
from __future__ import annotations

import numpy as np


def compare(actual: np.ndarray, reference: np.ndarray) -> dict:
    """max abs error, max error relative to the reference's largest magnitude, cosine similarity,
    and the worst element's index."""
    actual = np.asarray(actual, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if actual.shape != reference.shape:
        raise ValueError(f"shape {actual.shape} does not match the reference's {reference.shape}")
    diff = np.abs(actual - reference)
    if not np.all(np.isfinite(actual)):
        worst = np.unravel_index(np.argmax(~np.isfinite(actual)), actual.shape)
        return {"max_abs_err": float("inf"), "max_rel_err": float("inf"), "cosine": float("nan"),
                "worst_index": [int(i) for i in worst], "worst_actual": float(actual[worst]),
                "worst_reference": float(reference[worst])}
    worst = np.unravel_index(int(np.argmax(diff)), diff.shape)
    scale = float(np.abs(reference).max())
    norms = float(np.linalg.norm(actual) * np.linalg.norm(reference))
    return {
        "max_abs_err": float(diff[worst]),
        "max_rel_err": float(diff[worst] / scale) if scale else float(diff[worst]),
        "cosine": float(np.vdot(actual, reference) / norms) if norms else 1.0,
        "worst_index": [int(i) for i in worst],
        "worst_actual": float(actual[worst]),
        "worst_reference": float(reference[worst]),
    }
