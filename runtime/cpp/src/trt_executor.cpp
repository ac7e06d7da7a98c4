// The TensorRT executor (TensorRT 10 / 11 C++ API, CUDA runtime): runs the manifest's fp16 plan
// that is compatible with this GPU and TensorRT, as runtime/tensorrt.py does in Python.
//
// Compiled only with -DDITRT_WITH_TENSORRT=ON. It has NOT been compiled or run in the project's
// CI (no TensorRT headers there): tests/test_cpp_runtime.py checks statically that every TensorRT
// name it uses exists in TensorRT 11.4's API, and lists the CUDA runtime symbols.
//
// Design, as the Python backend: one execution context per static batch size ("slot", at most
// kMaxSlots kept, least recently used dropped), each with pinned host and device buffers bound
// once (setInputShape / setTensorAddress) and a CUDA graph captured after its first plain
// enqueueV3; all contexts share one scratch allocation, which is safe because every call is
// serialised on the executor's one stream (a mutex, and a synchronize at the end of each run).
#include <NvInfer.h>
#include <NvInferVersion.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "engine_compat.hpp"
#include "error.hpp"
#include "executor.hpp"
#include "sha256.hpp"

namespace ditrt_core {
namespace {

constexpr size_t kMaxSlots = 8;
const char* const kInputs[] = {"latent", "timestep", "class_label"};
const char* const kOutput = "model_output";

void cuda_check(cudaError_t status, const char* what) {
    if (status != cudaSuccess)
        throw Error(Status::Executor, std::string(what) + " failed: " + cudaGetErrorName(status) + " (" +
                                          cudaGetErrorString(status) + ")");
}

// Keeps TensorRT's errors: a null engine comes with no other explanation.
class Logger : public nvinfer1::ILogger {
public:
    void log(Severity severity, nvinfer1::AsciiChar const* msg) noexcept override {
        if (severity == Severity::kERROR || severity == Severity::kINTERNAL_ERROR) {
            std::lock_guard<std::mutex> lock(mutex_);
            errors_.push_back(msg);
            if (errors_.size() > 20) errors_.erase(errors_.begin());
        } else if (severity == Severity::kWARNING) {
            std::lock_guard<std::mutex> lock(mutex_);
            warnings_.push_back(msg);
            if (warnings_.size() > 20) warnings_.erase(warnings_.begin());
        }
    }
    std::string errors() {
        std::lock_guard<std::mutex> lock(mutex_);
        std::string all;
        for (const auto& e : errors_) all += (all.empty() ? "" : "; ") + e;
        return all.empty() ? "TensorRT logged no error" : all;
    }

private:
    std::mutex mutex_;
    std::vector<std::string> errors_, warnings_;
};

struct CudaDeleter {
    void operator()(void* p) const { cudaFree(p); }
};
struct PinnedDeleter {
    void operator()(void* p) const { cudaFreeHost(p); }
};

// One static batch size: its context, buffers and CUDA graph.
struct Slot {
    int64_t rows = 0;
    std::unique_ptr<nvinfer1::IExecutionContext> context;
    std::map<std::string, std::unique_ptr<void, PinnedDeleter>> host;
    std::map<std::string, std::unique_ptr<void, CudaDeleter>> device;
    std::map<std::string, size_t> bytes;
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t graph_exec = nullptr;
    int64_t runs = 0;
    ~Slot() {
        if (graph_exec) cudaGraphExecDestroy(graph_exec);
        if (graph) cudaGraphDestroy(graph);
        context.reset();  // before its buffers (members are destroyed after this body)
    }
};

std::string trt_version_text() {
    return std::to_string(NV_TENSORRT_MAJOR) + "." + std::to_string(NV_TENSORRT_MINOR) + "." +
           std::to_string(NV_TENSORRT_PATCH) + "." + std::to_string(NV_TENSORRT_BUILD);
}

std::vector<char> read_file(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) throw Error(Status::Artifact, "cannot read TensorRT plan " + path);
    f.seekg(0, std::ios::end);
    std::vector<char> data(size_t(f.tellg()));
    f.seekg(0);
    f.read(data.data(), std::streamsize(data.size()));
    if (!f.good()) throw Error(Status::Artifact, "error while reading TensorRT plan " + path);
    return data;
}

class TensorRTExecutor : public Executor {
public:
    TensorRTExecutor(int device, int64_t max_batch) : device_(device), requested_max_(max_batch) {}

    ~TensorRTExecutor() override {
        if (stream_) cudaStreamSynchronize(stream_);
        lru_.clear();  // contexts before the engine, the engine before its runtime
        scratch_.reset();
        if (stream_) cudaStreamDestroy(stream_);
        engine_.reset();
        runtime_.reset();
    }

    void attach(const Manifest& m, bool verify) override {
        std::lock_guard<std::mutex> lock(mutex_);
        if (engine_) throw Error(Status::InvalidArgument, "this TensorRT executor is already bound to an artifact");
        cuda_check(cudaSetDevice(device_), "cudaSetDevice");
        cudaDeviceProp prop{};
        cuda_check(cudaGetDeviceProperties(&prop, device_), "cudaGetDeviceProperties");
        const std::string cc = std::to_string(prop.major) + "." + std::to_string(prop.minor);
        const EngineEntry& entry = choose(m, cc, prop.name);
        load(m, entry, verify);
        max_rows_ = requested_max_ > 0 ? std::min(requested_max_, profile_max_) : profile_max_;
        if (max_rows_ < profile_min_)
            throw Error(Status::InvalidArgument, "max_batch " + std::to_string(max_rows_) + " is below the plan profile's minimum of " +
                                                     std::to_string(profile_min_) + " rows; rebuild with a smaller --min-batch");
        cuda_check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
        scratch_bytes_ = std::max<int64_t>(engine_->getDeviceMemorySizeV2(), 256);
        void* scratch = nullptr;
        cuda_check(cudaMalloc(&scratch, size_t(scratch_bytes_)), "cudaMalloc (scratch)");
        scratch_.reset(scratch);
    }

    int64_t max_batch() const override { return max_rows_; }

    void run(const float* latent, const float* timestep, const int64_t* labels, int64_t rows, float* out) override {
        std::lock_guard<std::mutex> lock(mutex_);
        if (!engine_) throw Error(Status::Executor, "the TensorRT executor is not bound to an artifact");
        for (int64_t start = 0; start < rows; start += max_rows_) {
            const int64_t n = std::min(max_rows_, rows - start);
            run_chunk(latent + start * latent_row_, timestep + start, labels + start, n, out + start * output_row_);
        }
    }

private:
    const EngineEntry& choose(const Manifest& m, const std::string& cc, const std::string& gpu_name) {
        const std::map<std::string, std::string>* graph_sha = nullptr;
        auto net = m.networks.find("denoiser");
        if (net != m.networks.end() && net->second.graphs.count("fp16")) graph_sha = &net->second.graphs.at("fp16").sha256;
        auto exists = [&](const std::string& f) { return std::filesystem::is_regular_file(m.path(f)); };
        const Choice choice = choose_engine(m.engines, trt_version_text(), cc, gpu_name, exists, graph_sha);
        if (!choice.entry) {
            std::string why = m.engines.empty() ? "the artifact has no TensorRT engine" : "no TensorRT plan runs here";
            for (const auto& r : choice.reasons) why += "\n  " + r;
            throw Error(Status::Unavailable, why + "\n(TensorRT " + trt_version_text() + " on " + gpu_name +
                                                 ", compute capability " + cc + "): build one with `ditrt build " +
                                                 m.directory + "`");
        }
        return *choice.entry;
    }

    void load(const Manifest& m, const EngineEntry& entry, bool verify) {
        const std::string path = m.path(entry.file);
        std::vector<char> plan = read_file(path);
        if (verify && sha256_hex(plan.data(), plan.size()) != entry.sha256)
            throw Error(Status::Artifact, path + " does not match its sha256 in the manifest (corrupt or replaced); rebuild it");
        runtime_.reset(nvinfer1::createInferRuntime(logger_));
        if (!runtime_) throw Error(Status::Unavailable, "TensorRT cannot start: " + logger_.errors());
        // A version-compatible plan embeds TensorRT's lean runtime (host code); ditrt built it.
        if (entry.version_compatible) runtime_->setEngineHostCodeAllowed(true);
        engine_.reset(runtime_->deserializeCudaEngine(plan.data(), plan.size()));
        if (!engine_)
            throw Error(Status::Artifact, "TensorRT could not deserialise " + path + ": " + logger_.errors() +
                                              "; the plan is corrupt or does not match this TensorRT/GPU: rebuild it");
        check_io(path);
        profile_min_ = engine_->getProfileShape(kInputs[0], 0, nvinfer1::OptProfileSelector::kMIN).d[0];
        profile_max_ = engine_->getProfileShape(kInputs[0], 0, nvinfer1::OptProfileSelector::kMAX).d[0];
    }

    // The engine's tensors must be the ditrt denoiser's: float latent and timestep, int64 labels,
    // float output, batch first and every other axis static.
    void check_io(const std::string& path) {
        const std::map<std::string, nvinfer1::DataType> want = {
            {kInputs[0], nvinfer1::DataType::kFLOAT}, {kInputs[1], nvinfer1::DataType::kFLOAT},
            {kInputs[2], nvinfer1::DataType::kINT64}, {kOutput, nvinfer1::DataType::kFLOAT}};
        std::map<std::string, bool> seen;
        for (int32_t i = 0; i < engine_->getNbIOTensors(); ++i) {
            const char* name = engine_->getIOTensorName(i);
            auto w = want.find(name);
            const bool input = engine_->getTensorIOMode(name) == nvinfer1::TensorIOMode::kINPUT;
            if (w == want.end() || engine_->getTensorDataType(name) != w->second || input == (w->first == kOutput))
                throw Error(Status::Artifact, path + ": tensor " + name + " is not one of a ditrt denoiser's (latent, timestep, "
                                                     "class_label float32/float32/int64 in, model_output float32 out); rebuild it");
            seen[name] = true;
            const nvinfer1::Dims dims = engine_->getTensorShape(name);
            int64_t per_row = 1;
            for (int32_t d = 1; d < dims.nbDims; ++d) per_row *= dims.d[d];
            if (w->first == kInputs[0]) latent_row_ = per_row;
            if (w->first == kOutput) output_row_ = per_row;
        }
        if (seen.size() != want.size()) throw Error(Status::Artifact, path + " lacks one of the denoiser's tensors; rebuild it");
    }

    Slot& slot(int64_t rows) {
        for (auto it = lru_.begin(); it != lru_.end(); ++it)
            if ((*it)->rows == rows) {
                lru_.splice(lru_.begin(), lru_, it);
                return *lru_.front();
            }
        while (lru_.size() >= kMaxSlots) lru_.pop_back();
        auto s = std::make_unique<Slot>();
        s->rows = rows;
        s->context.reset(engine_->createExecutionContext(nvinfer1::ExecutionContextAllocationStrategy::kUSER_MANAGED));
        if (!s->context) throw Error(Status::Executor, "TensorRT could not create an execution context: " + logger_.errors());
        bind(*s);
        lru_.push_front(std::move(s));
        return *lru_.front();
    }

    // Scratch memory, input shapes, a pinned host and a device buffer per tensor, bound once.
    void bind(Slot& s) {
        s.context->setDeviceMemoryV2(scratch_.get(), scratch_bytes_);
        for (const char* name : kInputs) {
            nvinfer1::Dims dims = engine_->getTensorShape(name);
            dims.d[0] = s.rows;
            if (!s.context->setInputShape(name, dims))
                throw Error(Status::Executor, std::string("TensorRT rejected the shape of ") + name + ": " + logger_.errors());
        }
        const std::pair<const char*, size_t> tensors[] = {{kInputs[0], sizeof(float)}, {kInputs[1], sizeof(float)},
                                                          {kInputs[2], sizeof(int64_t)}, {kOutput, sizeof(float)}};
        for (const auto& [name, item] : tensors) {
            const nvinfer1::Dims dims = s.context->getTensorShape(name);
            size_t count = 1;
            for (int32_t d = 0; d < dims.nbDims; ++d) count *= size_t(dims.d[d]);
            void* host = nullptr;
            void* device = nullptr;
            cuda_check(cudaMallocHost(&host, count * item), "cudaMallocHost");  // pinned: truly async copies
            s.host[name].reset(host);
            cuda_check(cudaMalloc(&device, count * item), "cudaMalloc");
            s.device[name].reset(device);
            s.bytes[name] = count * item;
            if (!s.context->setTensorAddress(name, device))
                throw Error(Status::Executor, std::string("TensorRT rejected the address of ") + name + ": " + logger_.errors());
        }
    }

    // Record the slot's enqueueV3 into a CUDA graph. TensorRT wants one plain enqueue after a
    // shape change before capture: the slot's first run is that one. A failed capture leaves the
    // slot running without a graph.
    void capture(Slot& s) {
        cuda_check(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture");
        const bool enqueued = s.context->enqueueV3(stream_);
        cudaGraph_t graph = nullptr;
        const cudaError_t ended = cudaStreamEndCapture(stream_, &graph);  // always end the capture
        if (!enqueued || ended != cudaSuccess) {
            if (graph) cudaGraphDestroy(graph);
            cudaGetLastError();  // capture errors are not sticky: clear it
            return;
        }
        if (cudaGraphInstantiate(&s.graph_exec, graph, 0) != cudaSuccess) {
            cudaGraphDestroy(graph);
            s.graph_exec = nullptr;
            cudaGetLastError();
            return;
        }
        s.graph = graph;
    }

    void run_chunk(const float* latent, const float* timestep, const int64_t* labels, int64_t n, float* out) {
        Slot& s = slot(std::max(n, profile_min_));  // below the profile minimum: pad with row 0
        const std::pair<const char*, const void*> inputs[] = {{kInputs[0], latent}, {kInputs[1], timestep}, {kInputs[2], labels}};
        for (const auto& [name, src] : inputs) {
            char* host = static_cast<char*>(s.host[name].get());
            const size_t row = s.bytes[name] / size_t(s.rows);
            std::memcpy(host, src, row * size_t(n));
            for (int64_t r = n; r < s.rows; ++r) std::memcpy(host + row * size_t(r), host, row);
            cuda_check(cudaMemcpyAsync(s.device[name].get(), host, s.bytes[name], cudaMemcpyHostToDevice, stream_),
                       "cudaMemcpyAsync (to device)");
        }
        if (s.graph_exec) cuda_check(cudaGraphLaunch(s.graph_exec, stream_), "cudaGraphLaunch");
        else if (!s.context->enqueueV3(stream_)) throw Error(Status::Executor, "TensorRT execution failed: " + logger_.errors());
        cuda_check(cudaMemcpyAsync(s.host[kOutput].get(), s.device[kOutput].get(), s.bytes[kOutput], cudaMemcpyDeviceToHost,
                                   stream_),
                   "cudaMemcpyAsync (to host)");
        cuda_check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
        std::memcpy(out, s.host[kOutput].get(), s.bytes[kOutput] / size_t(s.rows) * size_t(n));
        if (++s.runs == 1) capture(s);
    }

    int device_;
    int64_t requested_max_, max_rows_ = 0, profile_min_ = 1, profile_max_ = 1, latent_row_ = 0, output_row_ = 0;
    int64_t scratch_bytes_ = 0;
    Logger logger_;
    std::unique_ptr<nvinfer1::IRuntime> runtime_;
    std::unique_ptr<nvinfer1::ICudaEngine> engine_;
    std::unique_ptr<void, CudaDeleter> scratch_;
    cudaStream_t stream_ = nullptr;
    std::list<std::unique_ptr<Slot>> lru_;  // most recently used first
    std::mutex mutex_;
};

}  // namespace

std::unique_ptr<Executor> make_tensorrt_executor(int cuda_device, int64_t max_batch) {
    return std::make_unique<TensorRTExecutor>(cuda_device, max_batch);
}

}  // namespace ditrt_core
