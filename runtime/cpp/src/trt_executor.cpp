// The TensorRT executor (TensorRT 10 / 11 C++ API, CUDA runtime): runs each network of the artifact
// (denoiser; decoder when there is a plan of it) from the manifest's fp16 plan that is compatible
// with this GPU and TensorRT, as runtime/execution/trt/backend.py does in Python, over the named tensors of
// the network's spec.
//
// Compiled only with -DDITRT_WITH_TENSORRT=ON. It has NOT been compiled or run in the project's
// CI (no TensorRT headers there): tests/test_cpp_runtime.py checks statically that every TensorRT
// name it uses exists in TensorRT 11.4's API, and lists the CUDA runtime symbols.
//
// Design, as the Python backend: per network one execution context per static batch size
// ("slot", at most kMaxSlots kept, least recently used dropped), each with pinned host and device
// buffers bound once (setInputShape / setTensorAddress) and a CUDA graph captured after its first
// plain enqueueV3; all contexts share one scratch allocation (the largest any plan needs), which
// is safe because every call is serialised on the executor's one stream (a mutex, and a
// synchronize at the end of each run).
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

// One static batch size of one plan: its context, buffers (by tensor name) and CUDA graph.
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

// One network's plan.
struct Plan {
    std::string path;
    std::unique_ptr<nvinfer1::ICudaEngine> engine;
    std::vector<std::string> inputs, outputs;  // tensor names, the spec's order
    std::map<std::string, size_t> item;        // tensor name -> bytes per element
    int64_t profile_min = 1, profile_max = 1, max_rows = 1;
    std::list<std::unique_ptr<Slot>> lru;  // most recently used first
};

std::string trt_version_text() {
    return std::to_string(NV_TENSORRT_MAJOR) + "." + std::to_string(NV_TENSORRT_MINOR) + "." +
           std::to_string(NV_TENSORRT_PATCH) + "." + std::to_string(NV_TENSORRT_BUILD);
}

nvinfer1::DataType trt_type(DType dtype) {
    switch (dtype) {
        case DType::Float32: return nvinfer1::DataType::kFLOAT;
        case DType::Float16: return nvinfer1::DataType::kHALF;
        case DType::Int64: return nvinfer1::DataType::kINT64;
        case DType::Int32: return nvinfer1::DataType::kINT32;
    }
    return nvinfer1::DataType::kFLOAT;
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
        plans_.clear();  // contexts before the engines, the engines before their runtime
        scratch_.reset();
        if (stream_) cudaStreamDestroy(stream_);
        runtime_.reset();
    }

    void attach(const Manifest& m, bool verify) override {
        std::lock_guard<std::mutex> lock(mutex_);
        if (runtime_) throw Error(Status::InvalidArgument, "this TensorRT executor is already bound to an artifact");
        cuda_check(cudaSetDevice(device_), "cudaSetDevice");
        cudaDeviceProp prop{};
        cuda_check(cudaGetDeviceProperties(&prop, device_), "cudaGetDeviceProperties");
        const std::string cc = std::to_string(prop.major) + "." + std::to_string(prop.minor);
        runtime_.reset(nvinfer1::createInferRuntime(logger_));
        if (!runtime_) throw Error(Status::Unavailable, "TensorRT cannot start: " + logger_.errors());
        int64_t scratch = 256;
        for (const NetworkSpec& network : m.networks) {
            std::string why;
            const EngineEntry* entry = choose(m, network, cc, prop.name, &why);
            if (!entry) {
                if (network.name == "denoiser") throw Error(Status::Unavailable, why);
                missing_[network.name] = why;  // ditrt_decode reports it; sampling does not need it
                continue;
            }
            Plan& plan = plans_[network.name];
            load(m, network, *entry, verify, plan);
            plan.max_rows = network.name == "denoiser" && requested_max_ > 0 ? std::min(requested_max_, plan.profile_max)
                                                                              : plan.profile_max;
            if (plan.max_rows < plan.profile_min)
                throw Error(Status::InvalidArgument, "max_batch " + std::to_string(plan.max_rows) + " is below the " + network.name +
                                                         " plan profile's minimum of " + std::to_string(plan.profile_min) +
                                                         " rows; rebuild with a smaller --min-batch");
            scratch = std::max<int64_t>(scratch, plan.engine->getDeviceMemorySizeV2());
        }
        cuda_check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
        void* memory = nullptr;
        cuda_check(cudaMalloc(&memory, size_t(scratch)), "cudaMalloc (scratch)");
        scratch_.reset(memory);
        scratch_bytes_ = scratch;
    }

    int64_t max_batch(const std::string& network) const override {
        auto it = plans_.find(network);
        return it == plans_.end() ? 0 : it->second.max_rows;
    }

    std::string describe(const std::string&) const override { return "TensorRT fp16 plan"; }

    void run(const NetworkSpec& network, const std::vector<TensorView>& inputs, const std::vector<TensorView>& outputs) override {
        std::lock_guard<std::mutex> lock(mutex_);
        Plan& plan = engine_for(network.name);
        const int64_t rows = inputs.at(0).shape[0];
        for (int64_t start = 0; start < rows; start += plan.max_rows) {
            const int64_t n = std::min(plan.max_rows, rows - start);
            run_chunk(plan, inputs, outputs, start, n);
        }
    }

private:
    Plan& engine_for(const std::string& network) {
        auto it = plans_.find(network);
        if (it != plans_.end()) return it->second;
        auto missing = missing_.find(network);
        throw Error(Status::Unavailable, missing != missing_.end() ? missing->second
                                                                    : "the TensorRT executor has no plan of the " + network + " network");
    }

    const EngineEntry* choose(const Manifest& m, const NetworkSpec& network, const std::string& cc, const std::string& gpu_name,
                              std::string* why) {
        const GraphEntry* graph = network.graph("fp16");
        auto exists = [&](const std::string& f) {
            try {
                return std::filesystem::is_regular_file(m.file_path(f, "engines[].file"));
            } catch (const Error&) {
                return false;  // a plan outside the artifact is never used
            }
        };
        const Choice choice = choose_engine(m.engines, trt_version_text(), cc, gpu_name, exists, graph ? &graph->sha256 : nullptr,
                                            network.name);
        if (choice.entry) return choice.entry;
        *why = "no TensorRT plan of the " + network.name + " network runs here";
        for (const auto& r : choice.reasons) *why += "\n  " + r;
        *why += "\n(TensorRT " + trt_version_text() + " on " + gpu_name + ", compute capability " + cc +
                "): build one with `ditrt build " + m.directory + " --network " + network.name + "`";
        return nullptr;
    }

    void load(const Manifest& m, const NetworkSpec& network, const EngineEntry& entry, bool verify, Plan& plan) {
        plan.path = m.file_path(entry.file, "engines[].file");
        std::vector<char> bytes = read_file(plan.path);
        if (verify && sha256_hex(bytes.data(), bytes.size()) != entry.sha256)
            throw Error(Status::Artifact, plan.path + " does not match its sha256 in the manifest (corrupt or replaced); rebuild it");
        // A version-compatible plan embeds TensorRT's lean runtime (host code); ditrt built it.
        runtime_->setEngineHostCodeAllowed(entry.version_compatible);
        plan.engine.reset(runtime_->deserializeCudaEngine(bytes.data(), bytes.size()));
        if (!plan.engine)
            throw Error(Status::Artifact, "TensorRT could not deserialise " + plan.path + ": " + logger_.errors() +
                                              "; the plan is corrupt or does not match this TensorRT/GPU: rebuild it");
        check_io(network, plan);
        const char* first = plan.inputs.front().c_str();
        plan.profile_min = plan.engine->getProfileShape(first, 0, nvinfer1::OptProfileSelector::kMIN).d[0];
        plan.profile_max = plan.engine->getProfileShape(first, 0, nvinfer1::OptProfileSelector::kMAX).d[0];
    }

    // The plan's tensors must be the network spec's: the same names, directions and dtypes (an
    // fp16 plan casts at its boundary), batch first and the same elements per row.
    void check_io(const NetworkSpec& network, Plan& plan) {
        std::map<std::string, std::pair<const TensorSpec*, bool>> want;  // name -> (spec, is input)
        for (const auto& t : network.inputs) want[t.name] = {&t, true};
        for (const auto& t : network.outputs) want[t.name] = {&t, false};
        if (plan.engine->getNbIOTensors() != int32_t(want.size()))
            throw Error(Status::Artifact, plan.path + " has " + std::to_string(plan.engine->getNbIOTensors()) +
                                              " tensors; the " + network.name + " network has " + std::to_string(want.size()) +
                                              ": rebuild it");
        for (int32_t i = 0; i < plan.engine->getNbIOTensors(); ++i) {
            const char* name = plan.engine->getIOTensorName(i);
            auto w = want.find(name);
            const bool input = plan.engine->getTensorIOMode(name) == nvinfer1::TensorIOMode::kINPUT;
            if (w == want.end() || input != w->second.second || plan.engine->getTensorDataType(name) != trt_type(w->second.first->dtype))
                throw Error(Status::Artifact, plan.path + ": tensor " + name + " is not one of the " + network.name +
                                                  " network's (name, direction and dtype of the manifest's spec); rebuild it");
            const nvinfer1::Dims dims = plan.engine->getTensorShape(name);
            int64_t per_row = 1;
            for (int32_t d = 1; d < dims.nbDims; ++d) per_row *= dims.d[d];
            if (per_row != w->second.first->per_row())
                throw Error(Status::Artifact, plan.path + ": tensor " + name + " has another shape than the manifest's; rebuild it");
            plan.item[name] = dtype_size(w->second.first->dtype);
        }
        for (const auto& t : network.inputs) plan.inputs.push_back(t.name);
        for (const auto& t : network.outputs) plan.outputs.push_back(t.name);
    }

    Slot& slot(Plan& plan, int64_t rows) {
        for (auto it = plan.lru.begin(); it != plan.lru.end(); ++it)
            if ((*it)->rows == rows) {
                plan.lru.splice(plan.lru.begin(), plan.lru, it);
                return *plan.lru.front();
            }
        while (plan.lru.size() >= kMaxSlots) plan.lru.pop_back();
        auto s = std::make_unique<Slot>();
        s->rows = rows;
        s->context.reset(plan.engine->createExecutionContext(nvinfer1::ExecutionContextAllocationStrategy::kUSER_MANAGED));
        if (!s->context) throw Error(Status::Executor, "TensorRT could not create an execution context: " + logger_.errors());
        bind(plan, *s);
        plan.lru.push_front(std::move(s));
        return *plan.lru.front();
    }

    // Scratch memory, input shapes, a pinned host and a device buffer per tensor, bound once.
    void bind(Plan& plan, Slot& s) {
        s.context->setDeviceMemoryV2(scratch_.get(), scratch_bytes_);
        for (const std::string& name : plan.inputs) {
            nvinfer1::Dims dims = plan.engine->getTensorShape(name.c_str());
            dims.d[0] = s.rows;
            if (!s.context->setInputShape(name.c_str(), dims))
                throw Error(Status::Executor, "TensorRT rejected the shape of " + name + ": " + logger_.errors());
        }
        for (const auto* names : {&plan.inputs, &plan.outputs})
            for (const std::string& name : *names) {
                const nvinfer1::Dims dims = s.context->getTensorShape(name.c_str());
                size_t count = 1;
                for (int32_t d = 0; d < dims.nbDims; ++d) count *= size_t(dims.d[d]);
                const size_t bytes = count * plan.item.at(name);
                void* host = nullptr;
                void* device = nullptr;
                cuda_check(cudaMallocHost(&host, bytes), "cudaMallocHost");  // pinned: truly async copies
                s.host[name].reset(host);
                cuda_check(cudaMalloc(&device, bytes), "cudaMalloc");
                s.device[name].reset(device);
                s.bytes[name] = bytes;
                if (!s.context->setTensorAddress(name.c_str(), device))
                    throw Error(Status::Executor, "TensorRT rejected the address of " + name + ": " + logger_.errors());
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

    // Rows [start, start + n) of every view; below the profile minimum, padded with the chunk's first row.
    void run_chunk(Plan& plan, const std::vector<TensorView>& inputs, const std::vector<TensorView>& outputs, int64_t start,
                   int64_t n) {
        Slot& s = slot(plan, std::max(n, plan.profile_min));
        for (const TensorView& v : inputs) {
            const std::string& name = v.spec->name;
            char* host = static_cast<char*>(s.host.at(name).get());
            const size_t row = s.bytes.at(name) / size_t(s.rows);
            std::memcpy(host, static_cast<const char*>(v.data) + size_t(start) * row, row * size_t(n));
            for (int64_t r = n; r < s.rows; ++r) std::memcpy(host + row * size_t(r), host, row);
            cuda_check(cudaMemcpyAsync(s.device.at(name).get(), host, s.bytes.at(name), cudaMemcpyHostToDevice, stream_),
                       "cudaMemcpyAsync (to device)");
        }
        if (s.graph_exec) cuda_check(cudaGraphLaunch(s.graph_exec, stream_), "cudaGraphLaunch");
        else if (!s.context->enqueueV3(stream_)) throw Error(Status::Executor, "TensorRT execution failed: " + logger_.errors());
        for (const TensorView& v : outputs)
            cuda_check(cudaMemcpyAsync(s.host.at(v.spec->name).get(), s.device.at(v.spec->name).get(), s.bytes.at(v.spec->name),
                                       cudaMemcpyDeviceToHost, stream_),
                       "cudaMemcpyAsync (to host)");
        cuda_check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
        for (const TensorView& v : outputs) {
            const size_t row = s.bytes.at(v.spec->name) / size_t(s.rows);
            std::memcpy(static_cast<char*>(v.data) + size_t(start) * row, s.host.at(v.spec->name).get(), row * size_t(n));
        }
        if (++s.runs == 1) capture(s);
    }

    int device_;
    int64_t requested_max_, scratch_bytes_ = 0;
    Logger logger_;
    std::unique_ptr<nvinfer1::IRuntime> runtime_;
    std::map<std::string, Plan> plans_;            // network -> its plan
    std::map<std::string, std::string> missing_;  // network -> why no plan runs here
    std::unique_ptr<void, CudaDeleter> scratch_;
    cudaStream_t stream_ = nullptr;
    std::mutex mutex_;
};

}  // namespace

std::unique_ptr<Executor> make_tensorrt_executor(int cuda_device, int64_t max_batch) {
    return std::make_unique<TensorRTExecutor>(cuda_device, max_batch);
}

}  // namespace ditrt_core
