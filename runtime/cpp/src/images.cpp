#include "images.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <png.h>

#include <algorithm>
#include <cerrno>
#include <csetjmp>
#include <cstdio>
#include <cstring>

#include "error.hpp"

namespace ditrt_core {
namespace {

void check_images(int64_t n, int64_t h, int64_t w) {
    if (n < 1 || h < 1 || w < 1)
        throw Error(Status::InvalidArgument, "images must be (N, 3, H, W) with N, H, W >= 1, got N " + std::to_string(n) +
                                                 ", H " + std::to_string(h) + ", W " + std::to_string(w));
    if (n > (int64_t(1) << 32) / 3 / h / w)
        throw Error(Status::InvalidArgument, "images of more than 2^32 values: refused");
}

// float32 -> uint8 as numpy's astype(np.uint8) after a clip to [0, 255]: truncation. (NaN, which
// the decoder check refuses before, becomes 0 rather than undefined behaviour.)
uint8_t truncate_u8(float v) { return v == v ? uint8_t(int(v)) : uint8_t(0); }

struct PngSink {
    std::vector<uint8_t>* bytes;
};

void write_to_vector(png_structp png, png_bytep data, png_size_t length) {
    auto* sink = static_cast<PngSink*>(png_get_io_ptr(png));
    sink->bytes->insert(sink->bytes->end(), data, data + length);
}

void flush_nothing(png_structp) {}

// libpng reports errors by longjmp: only plain C data lives in this frame between setjmp and the
// calls that may jump (no destructors are skipped). Returns false with `error` set on failure.
bool encode_c(const uint8_t* pixels, png_uint_32 height, png_uint_32 width, int color_type, size_t row_bytes,
              PngSink* sink, char* error, size_t error_size) {
    png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, nullptr, nullptr, nullptr);
    if (!png) {
        std::snprintf(error, error_size, "libpng could not start");
        return false;
    }
    png_infop info = png_create_info_struct(png);
    if (!info || setjmp(png_jmpbuf(png))) {
        std::snprintf(error, error_size, "libpng failed to encode the image");
        png_destroy_write_struct(&png, &info);
        return false;
    }
    png_set_write_fn(png, sink, write_to_vector, flush_nothing);
    png_set_IHDR(png, info, width, height, 8, color_type, PNG_INTERLACE_NONE, PNG_COMPRESSION_TYPE_DEFAULT,
                 PNG_FILTER_TYPE_DEFAULT);
    png_write_info(png, info);
    for (png_uint_32 y = 0; y < height; ++y) png_write_row(png, const_cast<png_bytep>(pixels + size_t(y) * row_bytes));
    png_write_end(png, nullptr);
    png_destroy_write_struct(&png, &info);
    return true;
}

}  // namespace

void to_uint8(const float* images, int64_t n, int64_t h, int64_t w, uint8_t* out) {
    check_images(n, h, w);
    const int64_t plane = h * w;
    for (int64_t j = 0; j < n; ++j)
        for (int64_t p = 0; p < plane; ++p)
            for (int64_t c = 0; c < 3; ++c) {
                const float x = images[(j * 3 + c) * plane + p] * 127.5f + 128.0f;
                out[(j * plane + p) * 3 + c] = truncate_u8(std::min(std::max(x, 0.0f), 255.0f));
            }
}

GridShape grid_shape(int64_t n, int64_t h, int64_t w, int64_t nrow, int64_t padding) {
    check_images(n, h, w);
    if (nrow < 1 || padding < 0 || padding > (int64_t(1) << 16))
        throw Error(Status::InvalidArgument, "grid: nrow must be >= 1 and padding >= 0 (got " + std::to_string(nrow) + ", " +
                                                 std::to_string(padding) + ")");
    if (n == 1) return {h, w};  // make_grid returns a single image as it is: no padding
    const int64_t cols = std::min(nrow, n), rows = (n + cols - 1) / cols;
    return {(h + padding) * rows + padding, (w + padding) * cols + padding};
}

void grid(const float* images, int64_t n, int64_t h, int64_t w, int64_t nrow, int64_t padding, uint8_t* out) {
    const GridShape g = grid_shape(n, h, w, nrow, padding);
    if (n == 1) padding = 0;
    const int64_t cols = n == 1 ? 1 : std::min(nrow, n), plane = h * w;
    // The canvas starts at the pad value 0, which save_image maps to 0 * 255 + 0.5 -> 0.
    std::fill(out, out + g.height * g.width * 3, uint8_t(0));
    for (int64_t k = 0; k < n; ++k) {
        const int64_t top = (k / cols) * (h + padding) + padding, left = (k % cols) * (w + padding) + padding;
        for (int64_t c = 0; c < 3; ++c)
            for (int64_t y = 0; y < h; ++y)
                for (int64_t x = 0; x < w; ++x) {
                    float v = images[(k * 3 + c) * plane + y * w + x];
                    v = (std::min(std::max(v, -1.0f), 1.0f) - -1.0f) / 2.0f;  // make_grid's norm_ip
                    v = std::min(std::max(v * 255.0f + 0.5f, 0.0f), 255.0f);  // mul(255).add_(0.5).clamp_(0, 255)
                    out[((top + y) * g.width + left + x) * 3 + c] = truncate_u8(v);
                }
    }
}

std::vector<uint8_t> png_encode(const uint8_t* pixels, int64_t height, int64_t width, int64_t channels) {
    if (channels != 1 && channels != 3)
        throw Error(Status::InvalidArgument, "a PNG image has 1 (gray) or 3 (RGB) channels, got " + std::to_string(channels));
    if (height < 1 || width < 1 || height > 1000000 || width > 1000000)
        throw Error(Status::InvalidArgument, "a PNG image is 1..1000000 pixels on each side, got " + std::to_string(height) +
                                                 " x " + std::to_string(width));
    std::vector<uint8_t> bytes;
    PngSink sink{&bytes};
    char error[128] = {0};
    if (!encode_c(pixels, png_uint_32(height), png_uint_32(width), channels == 3 ? PNG_COLOR_TYPE_RGB : PNG_COLOR_TYPE_GRAY,
                  size_t(width * channels), &sink, error, sizeof error))
        throw Error(Status::Internal, error);
    return bytes;
}

void png_write(const std::string& path, const uint8_t* pixels, int64_t height, int64_t width, int64_t channels) {
    if (path.empty()) throw Error(Status::InvalidArgument, "the PNG path is empty");
    struct stat info {};
    if (::lstat(path.c_str(), &info) == 0 && !S_ISREG(info.st_mode))
        throw Error(Status::InvalidArgument, path + " exists and is not a regular file; refusing to replace it");
    const std::vector<uint8_t> bytes = png_encode(pixels, height, width, channels);
    const size_t slash = path.rfind('/');
    const std::string dir = slash == std::string::npos ? "." : path.substr(0, slash + 1);
    const std::string name = slash == std::string::npos ? path : path.substr(slash + 1);
    std::string tmp = (slash == std::string::npos ? "" : dir) + "." + name + ".XXXXXX.tmp";
    std::vector<char> tmpl(tmp.begin(), tmp.end());
    tmpl.push_back('\0');
    const int fd = ::mkstemps(tmpl.data(), 4);
    if (fd < 0) throw Error(Status::Io, "cannot write " + path + ": " + std::strerror(errno));
    tmp = tmpl.data();
    size_t done = 0;
    while (done < bytes.size()) {
        const ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
            const int err = errno;
            ::close(fd);
            ::unlink(tmp.c_str());
            throw Error(Status::Io, "cannot write " + path + ": " + std::strerror(err));
        }
        done += size_t(n);
    }
    // mkstemp makes the file private; an image is meant to be shared (as runtime/core/files.py).
    if (::fchmod(fd, 0644) != 0 || ::close(fd) != 0 || ::rename(tmp.c_str(), path.c_str()) != 0) {
        const int err = errno;
        ::unlink(tmp.c_str());
        throw Error(Status::Io, "cannot write " + path + ": " + std::strerror(err));
    }
}

}  // namespace ditrt_core
