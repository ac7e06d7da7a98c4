// Header-only C++ wrapper over the ditrt C API: RAII handles, exceptions on the C++ side only.
#pragma once

#include <cmath>
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

class Executor {
public:
    // A denoiser on host buffers (see ditrt_denoiser_fn); `user` must outlive every pipeline using it.
    static Executor callback(ditrt_denoiser_fn fn, void* user, int64_t max_batch = 0) {
        ditrt_executor* e = nullptr;
        check(ditrt_executor_create_callback(fn, user, max_batch, &e));
        return Executor(e);
    }
    static Executor tensorrt(int cuda_device = 0, int64_t max_batch = 0) {
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

struct SampleOptions {
    const char* steps = nullptr;     // nullptr: the manifest's defaults
    const char* sampler = nullptr;
    const char* guidance = nullptr;
    double cfg_scale = NAN;
    double eta = 0.0;
    uint64_t seed = 0;
    const float* initial_noise = nullptr;  // (N, C, H, W) and (K, N, C, H, W), both or neither
    const float* step_noise = nullptr;
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
    int64_t num_steps(const char* steps = nullptr) const {
        int64_t k = 0;
        check(ditrt_num_steps(handle_, steps, &k));
        return k;
    }
    std::string graph_file(const std::string& network = "denoiser", const std::string& precision = "fp32") const {
        std::vector<char> path(4096);
        check(ditrt_graph_file(handle_, network.c_str(), precision.c_str(), path.data(), path.size()));
        return path.data();
    }
    // Latents (N, C, H, W) float32, flattened.
    std::vector<float> sample(const std::vector<int64_t>& labels, const SampleOptions& o = {}) {
        const auto shape = latent_shape();
        std::vector<float> out(labels.size() * size_t(shape[0] * shape[1] * shape[2]));
        check(ditrt_sample(handle_, labels.data(), int64_t(labels.size()), o.steps, o.sampler, o.eta, o.cfg_scale,
                           o.guidance, o.seed, o.initial_noise, o.step_noise, out.data(), int64_t(out.size())));
        return out;
    }
    ditrt_pipeline* get() const { return handle_; }

private:
    ditrt_pipeline* handle_ = nullptr;
};

}  // namespace ditrt
