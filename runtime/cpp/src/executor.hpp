// Executors run the denoiser network on host buffers (see ditrt_denoiser_fn for the layout).
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "../include/ditrt/ditrt.h"
#include "manifest.hpp"

namespace ditrt_core {

class Executor {
public:
    virtual ~Executor() = default;
    // Bind to an artifact before the first run (the TensorRT executor loads its plan here).
    virtual void attach(const Manifest& manifest, bool verify_files) = 0;
    // Most rows per run call; 0 means unlimited. The loop splits larger steps into chunks.
    virtual int64_t max_batch() const = 0;
    // Throws Error(Status::Executor) on failure.
    virtual void run(const float* latent, const float* timestep, const int64_t* class_label, int64_t rows,
                     float* model_output) = 0;
};

class CallbackExecutor : public Executor {
public:
    CallbackExecutor(ditrt_denoiser_fn fn, void* user, int64_t max_batch) : fn_(fn), user_(user), max_batch_(max_batch) {}
    void attach(const Manifest&, bool) override {}
    int64_t max_batch() const override { return max_batch_; }
    void run(const float* latent, const float* timestep, const int64_t* class_label, int64_t rows,
             float* model_output) override;

private:
    ditrt_denoiser_fn fn_;
    void* user_;
    int64_t max_batch_;
};

#ifdef DITRT_WITH_TENSORRT
std::unique_ptr<Executor> make_tensorrt_executor(int cuda_device, int64_t max_batch);  // trt_executor.cpp
#endif

}  // namespace ditrt_core
