// The C ABI: handles over the C++ objects, and the one place where exceptions become statuses.
#include <cmath>
#include <cstring>
#include <mutex>
#include <new>

#include "../include/ditrt/ditrt.h"
#include "error.hpp"
#include "executor.hpp"
#include "manifest.hpp"
#include "noise.hpp"
#include "sampler.hpp"
#include "schedule.hpp"

#ifndef DITRT_VERSION_STRING
#define DITRT_VERSION_STRING "0.0.0"
#endif

static_assert(int(ditrt_core::Status::InvalidArgument) == DITRT_INVALID_ARGUMENT &&
                  int(ditrt_core::Status::Artifact) == DITRT_ARTIFACT_ERROR && int(ditrt_core::Status::Schedule) == DITRT_SCHEDULE_ERROR &&
                  int(ditrt_core::Status::BufferTooSmall) == DITRT_BUFFER_TOO_SMALL &&
                  int(ditrt_core::Status::Executor) == DITRT_EXECUTOR_ERROR && int(ditrt_core::Status::Unavailable) == DITRT_UNAVAILABLE &&
                  int(ditrt_core::Status::Internal) == DITRT_INTERNAL_ERROR,
              "ditrt_core::Status must mirror ditrt_status");

struct ditrt_executor {
    std::shared_ptr<ditrt_core::Executor> impl;  // shared with the pipelines opened on it
};

struct ditrt_pipeline {
    ditrt_core::Manifest manifest;
    std::shared_ptr<ditrt_core::Executor> executor;
    bool verify = true;
    std::mutex mutex;  // one sample at a time: the executor's buffers are shared
};

namespace {

thread_local std::string last_error;

using ditrt_core::Error;
using ditrt_core::Status;

// Runs body, turning every exception into a status and the thread's last error.
template <class F>
ditrt_status guarded(F&& body) noexcept {
    try {
        body();
        last_error.clear();
        return DITRT_OK;
    } catch (const Error& e) {
        last_error = e.what();
        return ditrt_status(e.status());
    } catch (const std::bad_alloc&) {
        last_error = "out of memory";
    } catch (const std::exception& e) {
        last_error = std::string("internal error: ") + e.what();
    } catch (...) {
        last_error = "internal error: unknown exception";
    }
    return DITRT_INTERNAL_ERROR;
}

void require(const void* p, const char* name) {
    if (p == nullptr) throw Error(Status::InvalidArgument, std::string(name) + " must not be NULL");
}

}  // namespace

extern "C" {

const char* ditrt_last_error(void) { return last_error.c_str(); }

const char* ditrt_status_name(ditrt_status status) {
    switch (status) {
        case DITRT_OK: return "DITRT_OK";
        case DITRT_INVALID_ARGUMENT: return "DITRT_INVALID_ARGUMENT";
        case DITRT_ARTIFACT_ERROR: return "DITRT_ARTIFACT_ERROR";
        case DITRT_SCHEDULE_ERROR: return "DITRT_SCHEDULE_ERROR";
        case DITRT_BUFFER_TOO_SMALL: return "DITRT_BUFFER_TOO_SMALL";
        case DITRT_EXECUTOR_ERROR: return "DITRT_EXECUTOR_ERROR";
        case DITRT_UNAVAILABLE: return "DITRT_UNAVAILABLE";
        case DITRT_INTERNAL_ERROR: return "DITRT_INTERNAL_ERROR";
    }
    return "DITRT_UNKNOWN_STATUS";
}

const char* ditrt_version(void) { return DITRT_VERSION_STRING; }

int ditrt_has_tensorrt(void) {
#ifdef DITRT_WITH_TENSORRT
    return 1;
#else
    return 0;
#endif
}

ditrt_status ditrt_executor_create_callback(ditrt_denoiser_fn fn, void* user, int64_t max_batch, ditrt_executor** out) {
    return guarded([&] {
        require(out, "out");
        *out = nullptr;
        require(reinterpret_cast<const void*>(fn), "fn");
        if (max_batch < 0) throw Error(Status::InvalidArgument, "max_batch must be >= 0 (0: unlimited)");
        *out = new ditrt_executor{std::make_shared<ditrt_core::CallbackExecutor>(fn, user, max_batch)};
    });
}

ditrt_status ditrt_executor_create_tensorrt(int cuda_device, int64_t max_batch, ditrt_executor** out) {
    return guarded([&] {
        require(out, "out");
        *out = nullptr;
        if (max_batch < 0) throw Error(Status::InvalidArgument, "max_batch must be >= 0 (0: the plan's maximum)");
#ifdef DITRT_WITH_TENSORRT
        *out = new ditrt_executor{std::shared_ptr<ditrt_core::Executor>(ditrt_core::make_tensorrt_executor(cuda_device, max_batch))};
#else
        (void)cuda_device;
        throw Error(Status::Unavailable, "this ditrt library was built without TensorRT: rebuild with "
                                         "-DDITRT_WITH_TENSORRT=ON (TensorRT 10/11 and CUDA), or use a callback executor");
#endif
    });
}

void ditrt_executor_release(ditrt_executor* executor) { delete executor; }

ditrt_status ditrt_open(const char* artifact_dir, ditrt_executor* executor, uint32_t flags, ditrt_pipeline** out) {
    return guarded([&] {
        require(out, "out");
        *out = nullptr;
        require(artifact_dir, "artifact_dir");
        require(executor, "executor");
        if (flags & ~DITRT_OPEN_NO_VERIFY) throw Error(Status::InvalidArgument, "unknown flags " + std::to_string(flags));
        auto p = std::make_unique<ditrt_pipeline>();
        p->manifest = ditrt_core::load_manifest(artifact_dir);
        p->verify = !(flags & DITRT_OPEN_NO_VERIFY);
        p->executor = executor->impl;
        p->executor->attach(p->manifest, p->verify);
        *out = p.release();
    });
}

void ditrt_close(ditrt_pipeline* pipeline) { delete pipeline; }

ditrt_status ditrt_latent_shape(const ditrt_pipeline* p, int64_t shape[3]) {
    return guarded([&] {
        require(p, "pipeline");
        require(shape, "shape");
        shape[0] = p->manifest.in_channels;
        shape[1] = shape[2] = p->manifest.input_size;
    });
}

ditrt_status ditrt_num_classes(const ditrt_pipeline* p, int64_t* num_classes) {
    return guarded([&] {
        require(p, "pipeline");
        require(num_classes, "num_classes");
        *num_classes = p->manifest.num_classes;
    });
}

ditrt_status ditrt_num_steps(const ditrt_pipeline* p, const char* steps, int64_t* num_steps) {
    return guarded([&] {
        require(p, "pipeline");
        require(num_steps, "num_steps");
        const std::string spec = steps ? steps : p->manifest.default_steps;
        *num_steps = int64_t(ditrt_core::respaced_schedule(p->manifest.base_betas(), spec).size());
    });
}

ditrt_status ditrt_graph_file(const ditrt_pipeline* p, const char* network, const char* precision, char* path,
                              size_t capacity) {
    return guarded([&] {
        require(p, "pipeline");
        require(network, "network");
        require(precision, "precision");
        require(path, "path");
        const ditrt_core::GraphEntry& graph = p->manifest.graph(network, precision);
        if (p->verify) ditrt_core::verify_graph(p->manifest, graph);
        const std::string full = p->manifest.path(graph.file);
        if (full.size() + 1 > capacity)
            throw Error(Status::BufferTooSmall, "the path needs " + std::to_string(full.size() + 1) + " bytes, the buffer has " +
                                                    std::to_string(capacity));
        std::memcpy(path, full.c_str(), full.size() + 1);
    });
}

ditrt_status ditrt_sample(ditrt_pipeline* p, const int64_t* labels, int64_t num_labels, const char* steps,
                          const char* sampler, double eta, double cfg_scale, const char* guidance, uint64_t seed,
                          const float* initial_noise, const float* step_noise, float* out, int64_t out_capacity) {
    return guarded([&] {
        require(p, "pipeline");
        require(labels, "labels");
        require(out, "out");
        if (num_labels < 1) throw Error(Status::InvalidArgument, "num_labels must be at least 1");
        // NULL strings and a NaN scale take the manifest's defaults; "" is an error like any bad name.
        ditrt_core::SampleRequest r = ditrt_core::with_defaults(p->manifest, {labels, labels + num_labels});
        if (steps) r.steps = steps;
        if (sampler) r.sampler = sampler;
        if (guidance) r.guidance = guidance;
        if (!std::isnan(cfg_scale)) r.cfg_scale = cfg_scale;
        r.eta = eta;
        r.seed = seed;
        r.initial_noise = initial_noise;
        r.step_noise = step_noise;
        std::lock_guard<std::mutex> lock(p->mutex);
        ditrt_core::sample(p->manifest, *p->executor, r, out, out_capacity);
    });
}

const char* ditrt_noise_version(void) { return ditrt_core::kNoiseVersion; }

ditrt_status ditrt_noise_normal(uint64_t seed, uint64_t image_index, uint64_t draw_index, float* out, int64_t count) {
    return guarded([&] {
        if (count > 0) require(out, "out");
        ditrt_core::normal_fill(seed, image_index, draw_index, out, count);
    });
}

}  // extern "C"
