"""Shard files and the ADM evaluator's .npz, for `ditrt generate` (runtime/jobs/generate.py).

A shard is K consecutive images of a run: `shards/NNNNNN.npz` holds `images` uint8 (n, H, W, 3)
(or, for an artifact without a decoder, `latents` float32 (n, C, H, W)), `labels` int64 (n,) and
`indices` int64 (n,) (the global image indices), uncompressed, written under a temporary name and
renamed. The evaluator's npz is assembled from the shards by streaming: one
shard in memory at a time. Both are written by `NpzWriter` with fixed member timestamps, so equal
arrays make equal files.
"""
from __future__ import annotations

import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..core.errors import StepError
from ..core.files import atomic_output, sha256_file

SHARD_DIR = "shards"
OUTPUTS = ("images", "latents")  # what a shard holds: decoded images, or latents when there is no decoder
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed member timestamps: equal arrays give equal bytes


@dataclass(frozen=True)
class Shard:
    index: int
    start: int  # global index of its first image
    stop: int

    @property
    def name(self) -> str:
        return f"{SHARD_DIR}/{self.index:06d}.npz"

    def __str__(self) -> str:
        return f"shard {self.index} (images {self.start}..{self.stop - 1})"


def plan_shards(num_images: int, shard_size: int) -> list[Shard]:
    return [Shard(k, start, min(start + shard_size, num_images))
            for k, start in enumerate(range(0, num_images, shard_size))]


class NpzWriter:
    """An uncompressed .npz, as np.savez writes it (a zip of .npy members), written member by member
    and each member chunk by chunk, so an array never has to be in memory whole. Members carry a
    fixed timestamp: equal arrays make equal files."""

    def __init__(self, file):
        self._zip = zipfile.ZipFile(file, "w", zipfile.ZIP_STORED, allowZip64=True)

    @contextmanager
    def member(self, name: str, dtype, shape: tuple[int, ...]) -> Iterator[Callable[[np.ndarray], None]]:
        """A writer of `name`.npy's data, in C order; the chunks must add up to `shape` exactly."""
        dtype = np.dtype(dtype)
        info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_TIME)
        info.compress_type = zipfile.ZIP_STORED
        info.external_attr = 0o644 << 16
        want = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        written = 0
        with self._zip.open(info, "w", force_zip64=True) as out:
            np.lib.format.write_array_header_1_0(out, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                       "fortran_order": False, "shape": tuple(shape)})

            def write(chunk: np.ndarray) -> None:
                nonlocal written
                data = np.ascontiguousarray(chunk, dtype=dtype)
                written += data.nbytes
                if written > want:
                    raise StepError(f"{name}: more data than its shape {shape} holds")
                out.write(data.data)

            yield write
            if written != want:
                raise StepError(f"{name}: {written} bytes written for shape {shape} ({want} bytes)")

    def add(self, name: str, array: np.ndarray) -> None:
        with self.member(name, array.dtype, array.shape) as write:
            write(array)

    def __enter__(self) -> "NpzWriter":
        return self

    def __exit__(self, kind, error, trace) -> None:
        try:
            self._zip.close()  # the central directory (after an error too: the file is a temporary one)
        except Exception:
            if kind is None:
                raise


def _check_samples(array: np.ndarray, output: str, n: int) -> bool:
    """Images: uint8 (n, H, W, 3) as sample_ddp.py saves them; latents: float32 (n, C, H, W)."""
    if output == "images":
        return array.dtype == np.uint8 and array.ndim == 4 and array.shape[0] == n and array.shape[3] == 3
    return array.dtype == np.float32 and array.ndim == 4 and array.shape[0] == n


def write_shard(path: Path, samples: np.ndarray, labels: np.ndarray, indices: np.ndarray,
                output: str = "images") -> str:
    """One shard file (`images` or `latents`, labels, indices), atomically; its sha256."""
    if output not in OUTPUTS or not _check_samples(samples, output, len(indices)):
        raise StepError(f"a shard of {len(indices)} {output} cannot hold {samples.dtype} {samples.shape}")
    with atomic_output(path, suffix=".npz") as f, NpzWriter(f) as npz:
        npz.add(output, samples)
        npz.add("labels", labels.astype(np.int64))
        npz.add("indices", indices.astype(np.int64))
    return sha256_file(path)


def read_shard(path: Path, shard: Shard, output: str = "images",
               labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(samples, labels) of a shard file, checked against the plan: its indices, its labels (when
    given) and its `output` array's dtype and shape."""
    try:
        with np.load(path, allow_pickle=False) as z:
            samples, file_labels, indices = z[output], z["labels"], z["indices"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise StepError(f"{shard} ({path}) cannot be read: {type(e).__name__}: {e}") from None
    if (not _check_samples(samples, output, shard.stop - shard.start)
            or not np.array_equal(indices, np.arange(shard.start, shard.stop))
            or (labels is not None and not np.array_equal(file_labels, labels))):
        raise StepError(f"{shard} ({path}) does not hold this run's {output} {shard.start}..{shard.stop - 1}; remove "
                        "it and run again with --resume")
    return samples, file_labels


def write_npz(path: Path, shard_files: list[tuple[Shard, Path]], labels: np.ndarray,
              output: str = "images") -> tuple[int, ...]:
    """The ADM evaluator's .npz from the shards, streamed: `arr_0` the images, uint8 (N, H, W, 3)
    (the latents, float32 (N, C, H, W), for an artifact without a decoder), and the labels as `arr_1`
    (as ADM's image_sample.py saves them) and `labels`. One shard in memory at a time. Returns
    arr_0's shape."""
    (first_shard, first_file), rest = shard_files[0], shard_files[1:]
    samples, _ = read_shard(first_file, first_shard, output, labels[first_shard.start:first_shard.stop])
    shape = (len(labels), *samples.shape[1:])  # shard 0 sets the sample shape and dtype
    with atomic_output(path, suffix=".npz") as f, NpzWriter(f) as npz:
        with npz.member("arr_0", samples.dtype, shape) as write:
            write(samples)
            del samples
            for shard, file in rest:
                samples, _ = read_shard(file, shard, output, labels[shard.start:shard.stop])
                if samples.shape[1:] != shape[1:]:
                    raise StepError(f"{shard} holds {output} of shape {samples.shape[1:]}, shard 0 {shape[1:]}")
                write(samples)
                del samples
        npz.add("arr_1", labels)
        npz.add("labels", labels)
    return shape
