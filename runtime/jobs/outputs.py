"""The output policy: what a sampling job writes, and how, in one place for the CLI (`ditrt sample`,
`ditrt decode`), the server (`format` npy / png) and bulk generation.

- latents: `.npy` of the (N, C, H, W) float32 latents, written atomically;
- a grid: one PNG as the official `sample.py` writes it (images.grid, needs a decoder);
- a folder: one PNG per image, `000000.png ...` as `sample_ddp.py` names them (images.to_uint8).

An option that would be silently ignored is refused instead (a second latents path, a decoder
precision when nothing is decoded), and an image output on an artifact without a decoder is refused
before any sampling. Every file is written atomically; a write that fails (a full disk) is an
InputError naming the file, and leaves no partial file (docs/integrity.md).
"""
from __future__ import annotations

import io
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..core import images
from ..core.errors import InputError
from ..core.files import Input, atomic_output, check_outputs

FORMATS = {"npy": "application/octet-stream", "png": "image/png"}  # what the server answers


@dataclass(frozen=True)
class OutputPlan:
    latents: Path | None  # .npy of the latents
    grid: Path | None  # a PNG grid (sample.py)
    folder: Path | None  # per-image PNGs (sample_ddp.py)

    @property
    def decodes(self) -> bool:
        return self.grid is not None or self.folder is not None

    @classmethod
    def from_options(cls, out: Path | None, out_dir: Path | None, latents: Path | None, has_decoder: bool,
                     decoder_precision: str | None = None) -> "OutputPlan":
        """`--out` (a .png grid, or any other name for .npy latents; default sample.png with a decoder,
        else latents.npy), `--out-dir` (per-image PNGs), `--latents` (also keep the latents)."""
        out = Path(out) if out is not None else Path("sample.png" if has_decoder else "latents.npy")
        out_is_png = out.suffix.lower() == ".png"
        if not out_is_png and latents is not None:
            raise InputError(f"--out {out} already writes the latents (.npy); --latents {latents} would be a second "
                             "copy: give one of them, or --out GRID.png to write images")
        plan = cls(Path(latents) if latents is not None else (None if out_is_png else out),
                   out if out_is_png else None, Path(out_dir) if out_dir is not None else None)
        if plan.decodes and not has_decoder:
            raise InputError("this artifact has no decoder network, so no images can be written (export with --vae DIR "
                             "to add one); write the latents instead (--out latents.npy)")
        if decoder_precision is not None and not plan.decodes:
            raise InputError(f"--decoder-precision {decoder_precision} applies only when images are written "
                             "(--out GRID.png or --out-dir DIR); these outputs decode nothing")
        return plan.checked()

    def checked(self) -> "OutputPlan":
        """The plan, once nothing in the way of its outputs would make the write fail after the work."""
        for path in (self.latents, self.grid):
            if path is not None:
                check_writable(path)
        if self.folder is not None and os.path.lexists(self.folder) and not self.folder.is_dir():
            raise InputError(f"{self.folder} exists and is not a directory; per-image PNGs need a folder")
        return self

    def refuse_inputs(self, inputs: list[Input], count: int, first_index: int = 0) -> "OutputPlan":
        """The plan, once none of its `count` images' files (per-image PNGs from `first_index`) would
        replace one of `inputs` (the artifact's files, a latents input) or another output."""
        names = (self.folder / images.per_image_name(first_index + i) for i in range(count)) if self.folder else ()
        check_outputs([("--latents" if self.grid else "--out", self.latents), ("--out", self.grid),
                       *(("--out-dir", path) for path in names)], inputs)
        return self

    def write(self, latents: np.ndarray, decode: Callable[[np.ndarray], np.ndarray] | None = None,
              log: Callable[[str], None] = lambda m: None, first_index: int = 0) -> list[str]:
        """Write everything planned; returns one line per output. `decode` (latents -> images)
        is needed when the plan decodes; per-image PNGs are numbered from `first_index`."""
        written = []
        if self.latents is not None:
            save_npy(self.latents, latents)
            written.append(f"{self.latents} {tuple(latents.shape)}")
        if self.decodes:
            log(f"decoding {len(latents)} images ...")
            decoded = decode(latents)
            if self.grid is not None:
                images.write_png(self.grid, images.grid(decoded))
                written.append(f"{self.grid} (grid of {len(decoded)})")
            if self.folder is not None:
                paths = _write_folder(self.folder, images.to_uint8(decoded), first_index)
                written.append(f"{self.folder}/{paths[0].name}..{paths[-1].name}")
        return written


def _write_folder(folder: Path, images_uint8: np.ndarray, first_index: int = 0) -> list[Path]:
    """Per-image PNGs; when one fails (a full disk), the ones this call added go again (and the
    folder, when this call made it), so a folder never holds part of a failed run's images."""
    created = not os.path.lexists(folder)
    names = (folder / images.per_image_name(first_index + i) for i in range(len(images_uint8)))
    added = [p for p in names if not os.path.lexists(p)]
    try:
        return images.write_per_image(folder, images_uint8, first_index)
    except BaseException:
        for path in added:
            path.unlink(missing_ok=True)
        if created:
            try:
                folder.rmdir()
            except OSError:
                pass
        raise


def encode(latents: np.ndarray, fmt: str, decode: Callable[[np.ndarray], np.ndarray] | None = None) -> bytes:
    """A response body: `npy` the latents' .npy bytes, `png` the decoded grid as one PNG."""
    if fmt == "npy":
        buffer = io.BytesIO()
        np.save(buffer, latents)
        return buffer.getvalue()
    if fmt == "png":
        return images.png_bytes(images.grid(decode(latents)))
    raise InputError(f"unknown output format {fmt!r}; use {' or '.join(FORMATS)}")


def save_npy(path: str | Path, array) -> None:
    with atomic_output(path, suffix=".npy") as f:
        np.save(f, array)


def check_writable(path: Path) -> None:
    """Refuse at once what would fail only after the work: a directory or other non-file in the way."""
    if os.path.lexists(path) and not path.is_file():
        raise InputError(f"{path} exists and is not a regular file; refusing to replace it")


MAX_NPY_BYTES = 4 << 30  # latents of 4 GiB are ~250k DiT-XL/2 images: more is a mistake or an attack


def load_latents(path: str | Path, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """A latents .npy, checked before anything is allocated: a regular file, its header against its size,
    a floating dtype, 4 dimensions (and `shape` = (C, H, W) when given), at least one image."""
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"latents must be a .npy path, got {type(path).__name__} {path!r}")
    path = Path(path)
    try:
        regular = stat.S_ISREG(os.stat(path).st_mode)
    except OSError as e:
        raise InputError(f"cannot read latents {path}: {e.strerror or e}") from None
    if not regular:  # a FIFO would block the open, a device never end
        raise InputError(f"latents {path} is not a regular file")
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in header:
                raise ValueError(f"unsupported .npy version {version}")
            array_shape, fortran, dtype = header[version](f, max_header_size=10_000)
            data_bytes = os.fstat(f.fileno()).st_size - f.tell()
    except (OSError, ValueError, SyntaxError) as e:
        raise InputError(f"cannot read latents {path}: {e}") from None
    if dtype.hasobject or not np.issubdtype(dtype, np.floating):
        raise InputError(f"latents {path} hold {dtype}; expected float32 (N, C, H, W)")
    if any(side < 0 for side in array_shape):
        raise InputError(f"latents {path}: the header's shape {array_shape} has a negative size")
    want = math.prod(array_shape) * dtype.itemsize  # Python ints: no int64 wrap-around to a small size
    if want != data_bytes or want > MAX_NPY_BYTES:
        raise InputError(f"latents {path}: the header says {array_shape} {dtype} ({want} bytes) but the file holds "
                         f"{data_bytes} bytes of data" if want != data_bytes else
                         f"latents {path} are {want / 2**30:.1f} GiB, above the {MAX_NPY_BYTES >> 30} GiB limit")
    if len(array_shape) != 4 or array_shape[0] < 1 or (shape is not None and tuple(array_shape[1:]) != tuple(shape)):
        expected = f"(N, {', '.join(map(str, shape))})" if shape is not None else "(N, C, H, W)"
        raise InputError(f"latents {path} have shape {array_shape}; expected {expected} with N >= 1")
    array = np.load(path, allow_pickle=False)
    return array.astype(np.float32, copy=False)
