// Header-only C++ wrapper over the ditrt C API (ABI 2): RAII handles, exceptions on the C++ side
// only (ditrt::Exception carries the C status and message). See ditrt.h for every rule.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "ditrt.h"

namespace ditrt {

class Exception : public std::runtime_error {
public:
    Exception(ditrt_status status, const std::string& message) : std::runtime_error(message), status_(status) {}
    ditrt_status status() const { return status_; }

private:
    ditrt_status status_;
};

inline void check(ditrt_status status) {
    if (status != DITRT_OK) throw Exception(status, std::string(ditrt_status_name(status)) + ": " + ditrt_last_error());
}

// Throws unless the library implements the ABI this header describes.
inline void check_abi() {
    if (ditrt_abi_version() != DITRT_ABI_VERSION)
        throw Exception(DITRT_UNAVAILABLE, "libditrt implements ABI " + std::to_string(ditrt_abi_version()) +
                                               ", this program was built against ABI " + std::to_string(DITRT_ABI_VERSION));
}

class Executor {
public:
    // One callback for every network (see ditrt_run_fn); `user` must outlive every pipeline using it.
    static Executor callback(ditrt_run_fn fn, void* user, int64_t max_batch = 0) {
        ditrt_executor* e = nullptr;
        check(ditrt_executor_create_callback(fn, user, max_batch, &e));
        return Executor(e);
    }
    static Executor tensorrt(int32_t cuda_device = 0, int64_t max_batch = 0) {
        ditrt_executor* e = nullptr;
        check(ditrt_executor_create_tensorrt(cuda_device, max_batch, &e));
        return Executor(e);
    }
    Executor(Executor&& o) noexcept : handle_(std::exchange(o.handle_, nullptr)) {}
    Executor& operator=(Executor&& o) noexcept { std::swap(handle_, o.handle_); return *this; }
    Executor(const Executor&) = delete;
    Executor& operator=(const Executor&) = delete;
    ~Executor() { ditrt_executor_release(handle_); }
    ditrt_executor* get() const { return handle_; }

private:
    explicit Executor(ditrt_executor* e) : handle_(e) {}
    ditrt_executor* handle_;
};

// Sample options: string keys as ditrt_options_set documents ("sampler", "steps", "cfg_scale",
// "guidance", "eta", "seed", "image_offset"); set() returns *this to chain.
class Options {
public:
    Options() { check(ditrt_options_create(&handle_)); }
    Options(Options&& o) noexcept : handle_(std::exchange(o.handle_, nullptr)) {}
    Options& operator=(Options&& o) noexcept { std::swap(handle_, o.handle_); return *this; }
    Options(const Options&) = delete;
    Options& operator=(const Options&) = delete;
    ~Options() { ditrt_options_release(handle_); }

    Options& set(const std::string& key, const std::string& value) {
        check(ditrt_options_set(handle_, key.c_str(), value.c_str()));
        return *this;
    }
    Options& unset(const std::string& key) {
        check(ditrt_options_set(handle_, key.c_str(), nullptr));
        return *this;
    }
    // Borrowed: the arrays must outlive the sample calls that use them.
    Options& noise(const std::vector<float>& initial, const std::vector<float>& steps) {
        check(ditrt_options_set_noise(handle_, initial.data(), int64_t(initial.size()), steps.empty() ? nullptr : steps.data(),
                                      int64_t(steps.size())));
        return *this;
    }
    Options& progress(ditrt_progress_fn fn, void* user) {
        check(ditrt_options_set_progress(handle_, fn, user));
        return *this;
    }
    ditrt_options* get() const { return handle_; }

private:
    ditrt_options* handle_ = nullptr;
};

class Pipeline {
public:
    Pipeline(const std::string& artifact_dir, const Executor& executor, uint32_t flags = DITRT_OPEN_DEFAULT) {
        check(ditrt_open(artifact_dir.c_str(), executor.get(), flags, &handle_));
    }
    Pipeline(Pipeline&& o) noexcept : handle_(std::exchange(o.handle_, nullptr)) {}
    Pipeline& operator=(Pipeline&& o) noexcept { std::swap(handle_, o.handle_); return *this; }
    Pipeline(const Pipeline&) = delete;
    Pipeline& operator=(const Pipeline&) = delete;
    ~Pipeline() { ditrt_close(handle_); }

    std::vector<int64_t> latent_shape() const {  // (C, H, W)
        std::vector<int64_t> shape(3);
        check(ditrt_latent_shape(handle_, shape.data()));
        return shape;
    }
    std::vector<int64_t> image_shape() const {  // (3, H, W) of a decoded image
        std::vector<int64_t> shape(3);
        check(ditrt_image_shape(handle_, shape.data()));
        return shape;
    }
    int64_t num_classes() const {
        int64_t n = 0;
        check(ditrt_num_classes(handle_, &n));
        return n;
    }
    int64_t label_of(const std::string& name) const {  // a class name or number -> its label
        int64_t label = 0;
        check(ditrt_label_of(handle_, name.c_str(), &label));
        return label;
    }
    int64_t num_steps(const Options* options = nullptr) const {
        int64_t k = 0;
        check(ditrt_num_steps(handle_, options ? options->get() : nullptr, &k));
        return k;
    }
    bool has_network(const std::string& network) const { return ditrt_has_network(handle_, network.c_str()) == 1; }
    std::string graph_file(const std::string& network = "denoiser", const std::string& precision = "fp32") const {
        std::vector<char> path(4096);
        check(ditrt_graph_file(handle_, network.c_str(), precision.c_str(), path.data(), path.size()));
        return path.data();
    }
    // Latents (N, C, H, W) float32, flattened.
    std::vector<float> sample(const std::vector<int64_t>& labels, const Options* options = nullptr) {
        const auto shape = latent_shape();
        std::vector<float> out(labels.size() * size_t(shape[0] * shape[1] * shape[2]));
        check(ditrt_sample(handle_, labels.data(), int64_t(labels.size()), options ? options->get() : nullptr, out.data(),
                           int64_t(out.size())));
        return out;
    }
    // Images (N, 3, H, W) float32, flattened, from latents (N, C, H, W).
    std::vector<float> decode(const std::vector<float>& latents) {
        const auto in = latent_shape(), out_shape = image_shape();
        const int64_t n = int64_t(latents.size()) / (in[0] * in[1] * in[2]);
        std::vector<float> images(size_t(n * out_shape[0] * out_shape[1] * out_shape[2]));
        check(ditrt_decode(handle_, latents.data(), n, images.data(), int64_t(images.size())));
        return images;
    }
    ditrt_pipeline* get() const { return handle_; }

private:
    ditrt_pipeline* handle_ = nullptr;
};

// ---- images ----

struct Image {  // (height, width, channels) uint8
    int64_t height = 0, width = 0, channels = 3;
    std::vector<uint8_t> pixels;
};

// Image j of `images` (n, 3, h, w) as sample_ddp.py saves it.
inline std::vector<Image> to_uint8(const std::vector<float>& images, int64_t n, int64_t h, int64_t w) {
    std::vector<uint8_t> all(static_cast<size_t>(n * h * w * 3));
    check(ditrt_images_to_uint8(images.data(), n, h, w, all.data(), int64_t(all.size())));
    std::vector<Image> out(static_cast<size_t>(n));
    for (int64_t j = 0; j < n; ++j) {
        out[size_t(j)] = {h, w, 3, std::vector<uint8_t>(all.begin() + j * h * w * 3, all.begin() + (j + 1) * h * w * 3)};
    }
    return out;
}

// The grid sample.py saves (torchvision save_image, nrow 4, padding 2).
inline Image grid(const std::vector<float>& images, int64_t n, int64_t h, int64_t w, int64_t nrow = DITRT_GRID_NROW,
                  int64_t padding = DITRT_GRID_PADDING) {
    int64_t hw[2] = {0, 0};
    check(ditrt_grid_shape(n, h, w, nrow, padding, hw));
    Image g{hw[0], hw[1], 3, std::vector<uint8_t>(size_t(hw[0] * hw[1] * 3))};
    check(ditrt_images_grid(images.data(), n, h, w, nrow, padding, g.pixels.data(), int64_t(g.pixels.size())));
    return g;
}

inline std::vector<uint8_t> png_encode(const Image& image) {
    uint8_t* png = nullptr;
    int64_t size = 0;
    check(ditrt_png_encode(image.pixels.data(), image.height, image.width, image.channels, &png, &size));
    std::vector<uint8_t> bytes(png, png + size);
    ditrt_free(png);
    return bytes;
}

inline void png_write(const std::string& path, const Image& image) {
    check(ditrt_png_write(path.c_str(), image.pixels.data(), image.height, image.width, image.channels));
}

}  // namespace ditrt
