// Executors run an artifact's networks (denoiser, decoder, ...) on host buffers of named tensors;
// run_network() splits a call into chunks of the executor's max batch.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "../include/ditrt/ditrt.h"
#include "manifest.hpp"

namespace ditrt_core {

// One tensor of a call: C-order host memory, shape[0] the batch (rows or images).
struct TensorView {
    const TensorSpec* spec;  // name, dtype, role (from the manifest's network spec)
    std::vector<int64_t> shape;
    void* data;
};

class Executor {
public:
    virtual ~Executor() = default;
    // Bind to an artifact when a pipeline is opened on it (the TensorRT executor loads its plans).
    virtual void attach(const Manifest& manifest, bool verify_files) = 0;
    // Most batch entries (the network's batch unit) per run call; 0 means unlimited.
    virtual int64_t max_batch(const std::string& network) const = 0;
    // Runs `network` on inputs (in the spec's order), writing outputs; throws Error on failure.
    virtual void run(const NetworkSpec& network, const std::vector<TensorView>& inputs,
                     const std::vector<TensorView>& outputs) = 0;
    // How messages name it: "callback executor", "TensorRT fp16 plan".
    virtual std::string describe(const std::string& network) const = 0;
};

class CallbackExecutor : public Executor {
public:
    CallbackExecutor(ditrt_run_fn fn, void* user, int64_t max_batch) : fn_(fn), user_(user), max_batch_(max_batch) {}
    void attach(const Manifest&, bool) override {}
    int64_t max_batch(const std::string&) const override { return max_batch_; }
    void run(const NetworkSpec& network, const std::vector<TensorView>& inputs,
             const std::vector<TensorView>& outputs) override;
    std::string describe(const std::string&) const override { return "callback executor"; }

private:
    ditrt_run_fn fn_;
    void* user_;
    int64_t max_batch_;
};

// One network call over `batch` entries, in chunks of at most executor.max_batch(network) (all of
// it when 0). Each view's shape[0] is `batch`; its data holds batch * per_row values.
void run_network(Executor& executor, const NetworkSpec& network, int64_t batch, const std::vector<TensorView>& inputs,
                 const std::vector<TensorView>& outputs);

#ifdef DITRT_WITH_TENSORRT
std::unique_ptr<Executor> make_tensorrt_executor(int cuda_device, int64_t max_batch);  // trt_executor.cpp
#endif

}  // namespace ditrt_core
