"""Grids of every size against torchvision's make_grid + save_image, written here again in torch from
torchvision's semantics (torchvision itself does not import beside this torch build), and the
per-image convention on random images."""
import math

import numpy as np
import pytest
import torch

from ditrt.runtime.core import images


def torchvision_save_image(batch: np.ndarray, nrow: int = 4, padding: int = 2, pad_value: float = 0.0) -> np.ndarray:
    """torchvision.utils.save_image(batch, nrow=nrow, normalize=True, value_range=(-1, 1)) as the array it
    writes: make_grid (clamp to the range, shift and scale to [0, 1], ceil(n / nrow) rows of nrow cells
    of size + padding, a single image returned without padding), then mul(255).add(0.5).clamp(0, 255)
    and a uint8 cast, HWC."""
    tensor = torch.from_numpy(batch).clone()
    low, high = -1.0, 1.0
    tensor.clamp_(min=low, max=high)
    tensor.sub_(low).div_(max(high - low, 1e-5))
    if tensor.size(0) == 1:
        canvas = tensor.squeeze(0)
    else:
        count = tensor.size(0)
        columns = min(nrow, count)
        rows = int(math.ceil(float(count) / columns))
        height, width = tensor.size(2) + padding, tensor.size(3) + padding
        canvas = tensor.new_full((tensor.size(1), height * rows + padding, width * columns + padding), pad_value)
        k = 0
        for y in range(rows):
            for x in range(columns):
                if k >= count:
                    break
                canvas.narrow(1, y * height + padding, height - padding).narrow(
                    2, x * width + padding, width - padding).copy_(tensor[k])
                k += 1
    return canvas.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to(torch.uint8).numpy()


@pytest.mark.parametrize("count", range(1, 10))
def test_grid_of_any_size_is_torchvisions(count):
    rng = np.random.default_rng(count)
    batch = (rng.standard_normal((count, 3, 6, 5)) * 0.8).astype(np.float32)  # some values past [-1, 1]
    np.testing.assert_array_equal(images.grid(batch), torchvision_save_image(batch))


@pytest.mark.parametrize("nrow", [1, 3, 8])
def test_grid_nrow(nrow):
    batch = np.random.default_rng(nrow).uniform(-1.2, 1.2, (7, 3, 4, 4)).astype(np.float32)
    np.testing.assert_array_equal(images.grid(batch, nrow=nrow), torchvision_save_image(batch, nrow=nrow))


def test_to_uint8_is_sample_ddp():
    """sample_ddp.py: torch.clamp(127.5 * x + 128.0, 0, 255).permute(0, 2, 3, 1).to(uint8)."""
    batch = np.random.default_rng(0).uniform(-1.5, 1.5, (5, 3, 4, 6)).astype(np.float32)
    x = torch.from_numpy(batch)
    expected = torch.clamp(127.5 * x + 128.0, 0, 255).permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8).numpy()
    np.testing.assert_array_equal(images.to_uint8(batch), expected)
