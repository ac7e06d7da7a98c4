"""Decoded images to uint8 arrays and PNG files, exactly as the official DiT scripts write them.
numpy only; Pillow is imported when a PNG is written or read. No torch, no torchvision.

- `to_uint8`: what `sample_ddp.py` saves per image: `clamp(127.5 * x + 128, 0, 255)`, truncated
  to uint8 (no rounding), NCHW -> NHWC.
- `grid`: what `sample.py` saves: torchvision `save_image(images, nrow=4, normalize=True,
  value_range=(-1, 1))`: clamp to [-1, 1], (x + 1) / 2, tile with padding 2 (pad value 0), then
  `x * 255 + 0.5` clamped and truncated to uint8.
Both compute in float32 in the same operation order as the torch code, so the bytes agree.
The two conventions differ by up to one level; neither is "the" image.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .errors import InputError, StepError
from .files import atomic_output

GRID_NROW = 4
GRID_PADDING = 2
GRID_PAD_VALUE = 0.0
_F = np.float32


class ImageError(InputError):
    """Images or an output path that cannot be used, with the reason in the message."""


class NonFiniteImageError(StepError):
    """A decoder produced NaN or inf."""


def _as_nchw(images, what: str) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ImageError(f"{what}: expected images shaped (N, 3, H, W), got {images.shape}")
    if not np.issubdtype(images.dtype, np.floating):
        raise ImageError(f"{what}: expected floating-point images, got {images.dtype}")
    return images.astype(np.float32, copy=False)


def to_uint8(images) -> np.ndarray:
    """(N, 3, H, W) float images in [-1, 1] -> (N, H, W, 3) uint8, as sample_ddp.py."""
    x = _as_nchw(images, "to_uint8")
    x = np.clip(x * _F(127.5) + _F(128.0), _F(0), _F(255))
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)).astype(np.uint8)  # truncation: values are >= 0


def grid(images, nrow: int = GRID_NROW, padding: int = GRID_PADDING, pad_value: float = GRID_PAD_VALUE) -> np.ndarray:
    """(N, 3, H, W) float images in [-1, 1] -> one (rows*(H+p)+p, cols*(W+p)+p, 3) uint8 grid, as
    torchvision's save_image(images, nrow, padding, pad_value, normalize=True, value_range=(-1, 1))."""
    x = _as_nchw(images, "grid")
    if nrow < 1 or padding < 0:
        raise ImageError(f"grid: nrow must be >= 1 and padding >= 0 (got {nrow}, {padding})")
    low, high = _F(-1.0), _F(1.0)
    x = (np.clip(x, low, high) - low) / _F(max(float(high - low), 1e-5))  # make_grid's norm_ip
    n, c, h, w = x.shape
    if n == 1:  # make_grid returns a single image as it is: no padding
        canvas = x[0]
    else:
        cols = min(nrow, n)
        rows = math.ceil(n / cols)
        cell_h, cell_w = h + padding, w + padding
        canvas = np.full((c, cell_h * rows + padding, cell_w * cols + padding), _F(pad_value), dtype=np.float32)
        for k in range(n):
            r, col = divmod(k, cols)
            top, left = r * cell_h + padding, col * cell_w + padding
            canvas[:, top:top + h, left:left + w] = x[k]
    out = np.clip(canvas * _F(255) + _F(0.5), _F(0), _F(255))  # save_image: mul(255).add_(0.5).clamp_(0, 255)
    return np.ascontiguousarray(out.transpose(1, 2, 0)).astype(np.uint8)


def check_finite(images, network: str = "decoder", precision: str = "fp16") -> None:
    """Refuse NaN/inf images with a message naming the network and graph precision."""
    images = np.asarray(images)
    finite = np.isfinite(images)
    if finite.all():
        return
    bad = finite.reshape(len(images), -1).all(axis=1) if images.ndim >= 2 else finite
    which = [int(i) for i in np.flatnonzero(~bad)]
    shown = ", ".join(map(str, which[:10])) + (" ..." if len(which) > 10 else "")
    count = int((~finite).sum())
    advice = ("float16 overflow is the usual cause: rerun with --decoder-precision fp32" if precision != "fp32" else
              "the float32 decoder overflows only on non-finite or huge latents: check the sampler's output")
    raise NonFiniteImageError(f"the {network} network ({precision} graph) produced {count} non-finite values "
                              f"(NaN/inf) in image(s) {shown}; {advice}")


def write_png(path: str | Path, array) -> Path:
    """Write an (H, W, 3) or (H, W) uint8 array as PNG, atomically (temporary name, then rename).
    Refuses a path that exists and is not a regular file."""
    path = Path(path)
    array = np.asarray(array)
    if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        raise ImageError(f"write_png {path}: expected a uint8 (H, W, 3) or (H, W) array, got {array.dtype} {array.shape}")
    if path.exists() and not path.is_file():
        raise ImageError(f"write_png: {path} exists and is not a regular file")
    if path.is_dir():  # a dangling name is fine; a directory never is
        raise ImageError(f"write_png: {path} is a directory")
    data = png_bytes(array)
    with atomic_output(path, suffix=".png") as f:
        f.write(data)
    return path


def png_bytes(array) -> bytes:
    """An (H, W, 3) or (H, W) uint8 array encoded as PNG (Pillow)."""
    import io
    from PIL import Image
    array = np.asarray(array)
    if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        raise ImageError(f"png_bytes: expected a uint8 (H, W, 3) or (H, W) array, got {array.dtype} {array.shape}")
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG")
    return buffer.getvalue()


def per_image_name(index: int) -> str:
    """sample_ddp.py's file name for image `index`: 000000.png, 000001.png, ..."""
    return f"{index:06d}.png"


def write_per_image(folder: str | Path, images_uint8, start_index: int = 0) -> list[Path]:
    """Write (N, H, W, 3) uint8 images as <folder>/<index:06d>.png, as sample_ddp.py names them."""
    folder = Path(folder)
    return [write_png(folder / per_image_name(start_index + i), image) for i, image in enumerate(images_uint8)]
