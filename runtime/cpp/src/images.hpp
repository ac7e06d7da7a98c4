// Decoded images to uint8 and PNG, byte for byte as runtime/core/images.py writes them (float32 in the
// torch code's operation order), and PNG encoding with libpng, to memory or atomically to a file.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace ditrt_core {

inline constexpr int64_t kGridNrow = 4, kGridPadding = 2;  // runtime/core/images.py GRID_NROW, GRID_PADDING

// (N, 3, H, W) float images in [-1, 1] -> (N, H, W, 3) uint8: clamp(127.5 x + 128, 0, 255),
// truncated (sample_ddp.py). `out` holds n * h * w * 3 bytes.
void to_uint8(const float* images, int64_t n, int64_t h, int64_t w, uint8_t* out);

// The (rows, cols) of the grid torchvision's make_grid lays out, and its (height, width).
struct GridShape {
    int64_t height, width;
};
GridShape grid_shape(int64_t n, int64_t h, int64_t w, int64_t nrow, int64_t padding);

// torchvision save_image(images, nrow, padding, normalize=True, value_range=(-1, 1)) as one
// (height, width, 3) uint8 image (pad value 0); a single image is returned unpadded.
void grid(const float* images, int64_t n, int64_t h, int64_t w, int64_t nrow, int64_t padding, uint8_t* out);

// An (H, W, channels) uint8 image (channels 1: gray, 3: RGB) as PNG bytes.
std::vector<uint8_t> png_encode(const uint8_t* pixels, int64_t height, int64_t width, int64_t channels);

// The PNG written to `path` atomically: a temporary name in the same directory, then rename. A
// path that exists and is not a regular file (a directory, a symbolic link, a device) is refused.
void png_write(const std::string& path, const uint8_t* pixels, int64_t height, int64_t width, int64_t channels);

}  // namespace ditrt_core
