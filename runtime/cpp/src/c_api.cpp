// The C ABI (version 2): handles over the C++ objects, and the one place where exceptions become
// statuses.
#include <algorithm>
#include <array>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <locale.h>
#include <new>

#include "../include/ditrt/ditrt.h"
#include "error.hpp"
#include "executor.hpp"
#include "images.hpp"
#include "manifest.hpp"
#include "noise.hpp"
#include "sampler.hpp"
#ifdef DITRT_WITH_OPENSSL
#include "signature.hpp"
#endif

#ifndef DITRT_VERSION_STRING
#define DITRT_VERSION_STRING "0.0.0"
#endif

using ditrt_core::Error;
using ditrt_core::Status;

static_assert(int(Status::InvalidArgument) == DITRT_INVALID_ARGUMENT && int(Status::Artifact) == DITRT_ARTIFACT_ERROR &&
                  int(Status::Schedule) == DITRT_SCHEDULE_ERROR && int(Status::BufferTooSmall) == DITRT_BUFFER_TOO_SMALL &&
                  int(Status::Executor) == DITRT_EXECUTOR_ERROR && int(Status::Unavailable) == DITRT_UNAVAILABLE &&
                  int(Status::Internal) == DITRT_INTERNAL_ERROR && int(Status::Cancelled) == DITRT_CANCELLED &&
                  int(Status::Step) == DITRT_STEP_ERROR && int(Status::Busy) == DITRT_BUSY && int(Status::Io) == DITRT_IO_ERROR,
              "ditrt_core::Status must mirror ditrt_status");
static_assert(int(ditrt_core::DType::Float32) == DITRT_FLOAT32 && int(ditrt_core::DType::Float16) == DITRT_FLOAT16 &&
                  int(ditrt_core::DType::Int64) == DITRT_INT64 && int(ditrt_core::DType::Int32) == DITRT_INT32,
              "ditrt_core::DType must mirror ditrt_dtype");
static_assert(sizeof(ditrt_tensor) == 88 || sizeof(void*) != 8, "ditrt_tensor's documented layout");

struct ditrt_executor {
    std::shared_ptr<ditrt_core::Executor> impl;  // shared with the pipelines opened on it
};

struct ditrt_pipeline {
    ditrt_core::Manifest manifest;  // read-only after ditrt_open: calls may run concurrently
    std::shared_ptr<ditrt_core::Executor> executor;
    bool verify = true;
};

struct ditrt_options {
    ditrt_core::SampleOptions sample;
    ditrt_progress_fn progress = nullptr;
    void* progress_user = nullptr;
};

namespace {

// The thread's error slots, one per depth of ditrt calls (ditrt.h, Errors): slot d holds the
// message of the last call that returned at depth d (0: the application; 1: a callback of a
// ditrt_sample / ditrt_decode). A call that a callback makes writes its own slot, never its outer
// call's. A nested ditrt_sample / ditrt_decode is refused (DITRT_BUSY), so calls nest at most two
// deep: the slots are fixed (no allocation when a call starts) and a deeper call shares the last.
constexpr size_t kErrorSlots = 4;
thread_local std::array<std::string, kErrorSlots> error_slots;
thread_local size_t call_depth = 0;  // the ditrt calls running on this thread
thread_local bool inside_call = false;  // this thread is in ditrt_sample / ditrt_decode (and so maybe in a callback)

std::string& error_slot(size_t depth) { return error_slots[std::min(depth, kErrorSlots - 1)]; }

// One fallible call's stay on the thread: the slot it reports in, and a fresh one for the calls
// its callbacks make (they start with no error of their own).
class CallLevel {
public:
    CallLevel() : depth_(call_depth++) { error_slot(call_depth).clear(); }
    ~CallLevel() { --call_depth; }
    CallLevel(const CallLevel&) = delete;
    CallLevel& operator=(const CallLevel&) = delete;
    std::string& message() const { return error_slot(depth_); }

private:
    size_t depth_;
};

// Runs body, turning every exception into a status and this call's error message.
template <class F>
ditrt_status guarded(F&& body) noexcept {
    const CallLevel level;
    try {
        body();
        level.message().clear();
        return DITRT_OK;
    } catch (const Error& e) {
        level.message() = e.what();
        return ditrt_status(e.status());
    } catch (const std::bad_alloc&) {
        level.message() = "out of memory";
    } catch (const std::exception& e) {
        level.message() = std::string("internal error: ") + e.what();
    } catch (...) {
        level.message() = "internal error: unknown exception";
    }
    return DITRT_INTERNAL_ERROR;
}

void require(const void* p, const char* name) {
    if (p == nullptr) throw Error(Status::InvalidArgument, std::string(name) + " must not be NULL");
}

// Marks this thread as inside a sampling / decoding call; a nested one (from a callback) is refused.
class CallScope {
public:
    explicit CallScope(const char* what) {
        if (inside_call)
            throw Error(Status::Busy, std::string(what) + " was called from inside a ditrt callback on this thread (a "
                                                          "re-entrant call): refused; run it after the outer call returns");
        inside_call = true;
    }
    ~CallScope() { inside_call = false; }
    CallScope(const CallScope&) = delete;
    CallScope& operator=(const CallScope&) = delete;
};

bool ascii_space(char c) { return c == ' ' || (c >= '\t' && c <= '\r'); }  // Python's Py_ISSPACE
bool ascii_digit(char c) { return c >= '0' && c <= '9'; }

// Digits with single underscores between them (Python's 1_000), appended to `out` without them.
bool python_digits(const std::string& s, size_t& i, std::string& out) {
    if (i >= s.size() || !ascii_digit(s[i])) return false;
    out += s[i++];
    while (i < s.size()) {
        if (ascii_digit(s[i])) {
            out += s[i++];
        } else if (s[i] == '_' && i + 1 < s.size() && ascii_digit(s[i + 1])) {
            ++i;
        } else {
            break;
        }
    }
    return true;
}

bool iequals(const std::string& a, const char* b) {
    if (a.size() != std::strlen(b)) return false;
    for (size_t i = 0; i < a.size(); ++i)
        if (std::tolower(static_cast<unsigned char>(a[i])) != b[i]) return false;
    return true;
}

// Python's float(text) over ASCII, no more and no less: ASCII whitespace around, a sign, then
// inf / infinity / nan in any case, or decimal digits (single underscores between digits) with an
// optional fraction and exponent. strtod's extras are refused: hexadecimal ("0x1p2"), nan(...)
// payloads, the locale's decimal point. Returns the number as a C-locale decimal for strtod_l.
bool python_float_text(const std::string& text, std::string& clean) {
    size_t b = 0, e = text.size();
    while (b < e && ascii_space(text[b])) ++b;
    while (e > b && ascii_space(text[e - 1])) --e;
    const std::string s = text.substr(b, e - b);
    size_t i = 0;
    clean.clear();
    if (i < s.size() && (s[i] == '+' || s[i] == '-')) clean += s[i++];
    const std::string word = s.substr(i);
    if (iequals(word, "inf") || iequals(word, "infinity") || iequals(word, "nan")) {
        clean += word;
        return true;
    }
    const bool whole = python_digits(s, i, clean);
    bool fraction = false;
    if (i < s.size() && s[i] == '.') {
        clean += s[i++];
        fraction = python_digits(s, i, clean);
    }
    if (!whole && !fraction) return false;
    if (i < s.size() && (s[i] == 'e' || s[i] == 'E')) {
        clean += s[i++];
        if (i < s.size() && (s[i] == '+' || s[i] == '-')) clean += s[i++];
        if (!python_digits(s, i, clean)) return false;
    }
    return i == s.size();
}

double parse_number(const char* key, const char* value) {
    static const locale_t c_locale = newlocale(LC_ALL_MASK, "C", locale_t(0));  // never the process's locale
    std::string clean;
    if (!python_float_text(value, clean) || c_locale == locale_t(0))
        throw Error(Status::InvalidArgument, std::string(key) + " must be a number as Python's float() reads it "
                                             "(decimal, e.g. 4.0 or 1e-3), got '" + value + "'");
    return strtod_l(clean.c_str(), nullptr, c_locale);  // out of range: +-inf or 0, as float()
}

uint64_t parse_uint64(const char* key, const char* value) {
    const size_t n = std::strlen(value);
    if (n == 0 || n > 20 || std::strspn(value, "0123456789") != n)
        throw Error(Status::InvalidArgument, std::string(key) + " must be a decimal integer in [0, 2^64 - 1], got '" + value + "'");
    errno = 0;
    const unsigned long long v = std::strtoull(value, nullptr, 10);
    if (errno == ERANGE)
        throw Error(Status::InvalidArgument, std::string(key) + " must be a decimal integer in [0, 2^64 - 1], got '" + value + "'");
    return uint64_t(v);
}

// The options of a call (the defaults for NULL), with the C progress callback bound.
ditrt_core::SampleOptions resolve(const ditrt_options* options) {
    if (!options) return {};
    ditrt_core::SampleOptions o = options->sample;
    if (options->progress) {
        const ditrt_progress_fn fn = options->progress;
        void* user = options->progress_user;
        o.progress = [fn, user](int64_t done, int64_t total, double t) { return fn(user, done, total, t); };
    }
    return o;
}

}  // namespace

extern "C" {

uint32_t ditrt_abi_version(void) { return DITRT_ABI_VERSION; }

const char* ditrt_last_error(void) { return error_slot(call_depth).c_str(); }

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
        case DITRT_CANCELLED: return "DITRT_CANCELLED";
        case DITRT_STEP_ERROR: return "DITRT_STEP_ERROR";
        case DITRT_BUSY: return "DITRT_BUSY";
        case DITRT_IO_ERROR: return "DITRT_IO_ERROR";
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

// ---- executors ----

ditrt_status ditrt_executor_create_callback(ditrt_run_fn fn, void* user, int64_t max_batch, ditrt_executor** out) {
    return guarded([&] {
        require(out, "out");
        *out = nullptr;
        require(reinterpret_cast<const void*>(fn), "fn");
        if (max_batch < 0) throw Error(Status::InvalidArgument, "max_batch must be >= 0 (0: unlimited)");
        *out = new ditrt_executor{std::make_shared<ditrt_core::CallbackExecutor>(fn, user, max_batch)};
    });
}

ditrt_status ditrt_executor_create_tensorrt(int32_t cuda_device, int64_t max_batch, ditrt_executor** out) {
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

// ---- options ----

ditrt_status ditrt_options_create(ditrt_options** out) {
    return guarded([&] {
        require(out, "out");
        *out = new ditrt_options();
    });
}

void ditrt_options_release(ditrt_options* options) { delete options; }

ditrt_status ditrt_options_set(ditrt_options* options, const char* key, const char* value) {
    return guarded([&] {
        require(options, "options");
        require(key, "key");
        ditrt_core::SampleOptions& o = options->sample;
        const std::string k = key;
        if (k == "sampler") o.sampler = value ? std::optional<std::string>(value) : std::nullopt;
        else if (k == "steps") o.steps = value ? std::optional<std::string>(value) : std::nullopt;
        else if (k == "guidance") o.guidance = value ? std::optional<std::string>(value) : std::nullopt;
        else if (k == "cfg_scale") {
            o.cfg_scale = value ? std::optional<double>(parse_number(key, value)) : std::nullopt;
            o.cfg_scale_text = value ? value : "";
        } else if (k == "eta") {
            o.eta = value ? std::optional<double>(parse_number(key, value)) : std::nullopt;
            o.eta_text = value ? value : "";
        } else if (k == "seed") o.seed = value ? parse_uint64(key, value) : 0;
        else if (k == "image_offset") o.image_offset = value ? std::optional<uint64_t>(parse_uint64(key, value)) : std::nullopt;
        else if (k == "atol" || k == "rtol" || k == "diffusion_norm" || k == "last_step_size" || k == "diffusion_form" ||
                 k == "last_step") {  // SiT's sampler options, checked against the sampler by ditrt_sample
            const bool numeric = k != "diffusion_form" && k != "last_step";
            if (!value) o.sampler_options.erase(k);
            else o.sampler_options[k] = numeric ? (parse_number(key, value), std::string(value)) : std::string(value);
        } else if (k == "cache" && (!value || std::string(value) == "none")) {
            // uncached: the monolithic denoiser, as without the key
        } else if (k == "cache" || k == "threshold" || k == "cache_interval" || k == "disable_cache_before_step" ||
                   k == "disable_cache_after_step" || k == "max_order")
            throw Error(Status::InvalidArgument, "option '" + k + "'" + (value ? "='" + std::string(value) + "'" : "") +
                                                 ": feature caching (first-block, taylorseer) is not implemented in the "
                                                 "C++ runtime; sample uncached (cache none) or with the Python runtime "
                                                 "(ditrt.runtime, docs/caching.md)");
        else
            throw Error(Status::InvalidArgument, "unknown option key '" + k + "'; the keys are sampler, steps, cfg_scale, "
                                                 "guidance, eta, seed, image_offset, atol, rtol, diffusion_form, "
                                                 "diffusion_norm, last_step, last_step_size");
    });
}

ditrt_status ditrt_options_set_noise(ditrt_options* options, const float* initial, int64_t initial_count,
                                     const float* step, int64_t step_count) {
    return guarded([&] {
        require(options, "options");
        ditrt_core::SampleOptions& o = options->sample;
        if (!initial) {
            if (step) throw Error(Status::InvalidArgument, "step noise without initial noise: give both (or initial alone for dpm++2m)");
            o.initial_noise = o.step_noise = nullptr;
            o.initial_count = o.step_count = 0;
            return;
        }
        if (initial_count < 1 || step_count < 0 || (step == nullptr) != (step_count == 0))
            throw Error(Status::InvalidArgument, "injected noise: initial_count must be >= 1 and step_count 0 exactly when step is "
                                                 "NULL, got " + std::to_string(initial_count) + " and " + std::to_string(step_count));
        o.initial_noise = initial;
        o.initial_count = initial_count;
        o.step_noise = step;
        o.step_count = step_count;
    });
}

ditrt_status ditrt_options_set_progress(ditrt_options* options, ditrt_progress_fn fn, void* user) {
    return guarded([&] {
        require(options, "options");
        options->progress = fn;
        options->progress_user = user;
    });
}

// ---- pipelines ----

ditrt_status ditrt_open(const char* artifact_dir, ditrt_executor* executor, uint32_t flags, ditrt_pipeline** out) {
    return ditrt_open_signed(artifact_dir, executor, flags, nullptr, out);
}

ditrt_status ditrt_open_signed(const char* artifact_dir, ditrt_executor* executor, uint32_t flags,
                               const char* public_key_path, ditrt_pipeline** out) {
    return guarded([&] {
        require(out, "out");
        *out = nullptr;
        require(artifact_dir, "artifact_dir");
        require(executor, "executor");
        if (flags & ~DITRT_OPEN_NO_VERIFY) throw Error(Status::InvalidArgument, "unknown flags " + std::to_string(flags));
        if (public_key_path != nullptr) {  // before the manifest is read: it is one of the signed files
#ifdef DITRT_WITH_OPENSSL
            ditrt_core::verify_signature(artifact_dir, public_key_path);
#else
            throw Error(Status::Unavailable, "a public key was given, but this libditrt was built without OpenSSL: "
                                             "it cannot verify signatures (install libssl-dev and rebuild)");
#endif
        }
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

ditrt_status ditrt_label_of(const ditrt_pipeline* p, const char* name, int64_t* label) {
    return guarded([&] {
        require(p, "pipeline");
        require(name, "name");
        require(label, "label");
        *label = ditrt_core::label_of(p->manifest.labels, p->manifest.has_labels, p->manifest.num_classes, name);
    });
}

ditrt_status ditrt_num_steps(const ditrt_pipeline* p, const ditrt_options* options, int64_t* num_steps) {
    return guarded([&] {
        require(p, "pipeline");
        require(num_steps, "num_steps");
        *num_steps = ditrt_core::plan_sampling(p->manifest, options ? options->sample : ditrt_core::SampleOptions{}).calls();
    });
}

int ditrt_has_network(const ditrt_pipeline* p, const char* network) {
    return p != nullptr && network != nullptr && p->manifest.network(network) != nullptr;
}

ditrt_status ditrt_image_shape(const ditrt_pipeline* p, int64_t shape[3]) {
    return guarded([&] {
        require(p, "pipeline");
        require(shape, "shape");
        const std::vector<int64_t> s = ditrt_core::image_shape(p->manifest);
        std::copy(s.begin(), s.end(), shape);
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
        const std::string full = p->manifest.file_path(graph.file, std::string("networks.") + network + ".graphs." + precision + ".file");
        if (full.size() + 1 > capacity)
            throw Error(Status::BufferTooSmall, "the path needs " + std::to_string(full.size() + 1) + " bytes, the buffer has " +
                                                    std::to_string(capacity));
        std::memcpy(path, full.c_str(), full.size() + 1);
    });
}

ditrt_status ditrt_sample(ditrt_pipeline* p, const int64_t* labels, int64_t num_labels, const ditrt_options* options,
                          float* out, int64_t out_capacity) {
    return guarded([&] {
        CallScope scope("ditrt_sample");
        require(p, "pipeline");
        if (num_labels < 1) throw Error(Status::InvalidArgument, "num_labels must be at least 1");
        require(labels, "labels");
        require(out, "out");
        if (num_labels > (int64_t(1) << 32)) throw Error(Status::InvalidArgument, "num_labels must be at most 2^32");
        ditrt_core::sample(p->manifest, *p->executor, {labels, labels + num_labels}, resolve(options), out, out_capacity);
    });
}

ditrt_status ditrt_decode(ditrt_pipeline* p, const float* latents, int64_t num_images, float* images, int64_t capacity) {
    return guarded([&] {
        CallScope scope("ditrt_decode");
        require(p, "pipeline");
        require(latents, "latents");
        require(images, "images");
        ditrt_core::decode(p->manifest, *p->executor, latents, num_images, images, capacity);
    });
}

// ---- images ----

ditrt_status ditrt_images_to_uint8(const float* images, int64_t n, int64_t height, int64_t width, uint8_t* out,
                                   int64_t capacity) {
    return guarded([&] {
        require(images, "images");
        require(out, "out");
        ditrt_core::grid_shape(n, height, width, 1, 0);  // the size checks
        const int64_t need = n * height * width * 3;
        if (capacity < need)
            throw Error(Status::BufferTooSmall, "the buffer holds " + std::to_string(capacity) + " bytes; the images need " +
                                                    std::to_string(need));
        ditrt_core::to_uint8(images, n, height, width, out);
    });
}

ditrt_status ditrt_grid_shape(int64_t n, int64_t height, int64_t width, int64_t nrow, int64_t padding, int64_t grid_hw[2]) {
    return guarded([&] {
        require(grid_hw, "grid_hw");
        const ditrt_core::GridShape g = ditrt_core::grid_shape(n, height, width, nrow, padding);
        grid_hw[0] = g.height;
        grid_hw[1] = g.width;
    });
}

ditrt_status ditrt_images_grid(const float* images, int64_t n, int64_t height, int64_t width, int64_t nrow,
                               int64_t padding, uint8_t* out, int64_t capacity) {
    return guarded([&] {
        require(images, "images");
        require(out, "out");
        const ditrt_core::GridShape g = ditrt_core::grid_shape(n, height, width, nrow, padding);
        const int64_t need = ditrt_core::checked_count({g.height, g.width, 3}, "the grid");
        if (capacity < need)
            throw Error(Status::BufferTooSmall, "the buffer holds " + std::to_string(capacity) + " bytes; the grid needs " +
                                                    std::to_string(need));
        ditrt_core::grid(images, n, height, width, nrow, padding, out);
    });
}

ditrt_status ditrt_png_encode(const uint8_t* pixels, int64_t height, int64_t width, int64_t channels, uint8_t** png,
                              int64_t* png_size) {
    return guarded([&] {
        require(png, "png");
        *png = nullptr;
        require(png_size, "png_size");
        require(pixels, "pixels");
        const std::vector<uint8_t> bytes = ditrt_core::png_encode(pixels, height, width, channels);
        auto* memory = static_cast<uint8_t*>(std::malloc(bytes.size()));
        if (!memory) throw std::bad_alloc();
        std::memcpy(memory, bytes.data(), bytes.size());
        *png = memory;
        *png_size = int64_t(bytes.size());
    });
}

ditrt_status ditrt_png_write(const char* path, const uint8_t* pixels, int64_t height, int64_t width, int64_t channels) {
    return guarded([&] {
        require(path, "path");
        require(pixels, "pixels");
        ditrt_core::png_write(path, pixels, height, width, channels);
    });
}

void ditrt_free(void* memory) { std::free(memory); }

// ---- noise ----

const char* ditrt_noise_version(void) { return ditrt_core::kNoiseVersion; }

ditrt_status ditrt_noise_normal(uint64_t seed, uint64_t image_index, uint64_t draw_index, float* out, int64_t count) {
    return guarded([&] {
        if (count > 0) require(out, "out");
        ditrt_core::normal_fill(seed, image_index, draw_index, out, count);
    });
}

}  // extern "C"
