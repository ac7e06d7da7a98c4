// ditrt-sample ARTIFACT --labels 1,2 [--sampler ddpm|ddim|dpm++2m|ode-euler|ode-heun2|ode-dopri5|sde-euler|sde-heun]
//              [--steps 50] [--cfg-scale 4] [--guidance official|standard] [--eta 0] [--atol 1e-6] [--rtol 1e-3]
//              [--seed 0] [--max-batch 0] [--no-verify]
//              [--executor tensorrt|PLUGIN.so] [--device 0]
//              [--out sample.png] [--out-dir DIR] [--latents latents.npy]
//
// A DiT artifact takes ddpm, ddim, dpm++2m (--eta: ddim); a SiT one the ODE and SDE samplers (--atol,
// --rtol: ode-dopri5). The whole job through the C ABI (via ditrt.hpp): sample latents, decode them with the artifact's
// decoder, write the grid PNG (--out, as the official sample.py) and one PNG per image (--out-dir,
// 000000.png ..., as sample_ddp.py); --latents also keeps the (N, C, H, W) float32 latents as .npy.
// The executor is TensorRT (the artifact's plans; a build with -DDITRT_WITH_TENSORRT=ON), or a
// plugin: a shared library exporting `int ditrt_plugin_run(...)` with ditrt_run_fn's signature,
// run as a callback executor (the tests use one that stands in for the networks).
#include <dlfcn.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <sys/stat.h>
#include <vector>

#include "ditrt/ditrt.hpp"

namespace {

int usage(const std::string& message) {
    std::cerr << "error: " << message << "\n"
              << "usage: ditrt-sample ARTIFACT --labels 1,2 [--sampler ddpm|ddim|dpm++2m (DiT) | ode-euler|ode-heun2|ode-dopri5|\n"
              << "                    sde-euler|sde-heun (SiT)] [--steps 50] [--cfg-scale 4] [--guidance official|standard]\n"
              << "                    [--eta 0] [--atol 1e-6] [--rtol 1e-3] [--seed 0] [--max-batch 0] [--no-verify]\n"
              << "                    [--executor tensorrt|PLUGIN.so] [--device 0]\n"
              << "                    [--out sample.png] [--out-dir DIR] [--latents latents.npy]\n";
    return 2;
}

std::vector<int64_t> parse_labels(const std::string& text) {
    std::vector<int64_t> labels;
    std::stringstream in(text);
    for (std::string item; std::getline(in, item, ',');) {
        char* end = nullptr;
        const long long v = std::strtoll(item.c_str(), &end, 10);
        if (item.empty() || *end != '\0') throw std::invalid_argument("--labels takes integers like 3,7, got " + text);
        labels.push_back(v);
    }
    return labels;
}

// .npy version 1.0: magic, header length, a Python dict literal padded to 64 bytes, raw data;
// written under a temporary name, then renamed.
void write_npy(const std::string& path, const std::vector<float>& data, const std::vector<int64_t>& shape) {
    std::string dims;
    for (int64_t d : shape) dims += std::to_string(d) + ", ";
    std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (" + dims.substr(0, dims.size() - 2) + "), }";
    header += std::string(64 - (10 + header.size() + 1) % 64, ' ') + "\n";
    const std::string tmp = path + ".tmp";
    {
        std::ofstream f(tmp, std::ios::binary);
        const uint16_t length = uint16_t(header.size());
        f.write("\x93NUMPY\x01\x00", 8);
        f.put(char(length & 0xff)).put(char(length >> 8));
        f << header;
        f.write(reinterpret_cast<const char*>(data.data()), std::streamsize(data.size() * sizeof(float)));
        if (!f) throw std::runtime_error("cannot write " + path);
    }
    if (std::rename(tmp.c_str(), path.c_str()) != 0) throw std::runtime_error("cannot write " + path);
}

ditrt::Executor make_executor(const std::string& kind, int32_t device, int64_t max_batch) {
    if (kind == "tensorrt") {
        if (!ditrt_has_tensorrt())
            throw ditrt::Exception(DITRT_UNAVAILABLE,
                                   "this build has no TensorRT executor: rebuild with -DDITRT_WITH_TENSORRT=ON on a machine "
                                   "with TensorRT 10/11 and CUDA, or give --executor PLUGIN.so");
        return ditrt::Executor::tensorrt(device, max_batch);
    }
    void* plugin = dlopen(kind.c_str(), RTLD_NOW | RTLD_LOCAL);  // kept loaded for the program's life
    if (!plugin) throw ditrt::Exception(DITRT_INVALID_ARGUMENT, std::string("cannot load the executor plugin: ") + dlerror());
    auto run = reinterpret_cast<ditrt_run_fn>(dlsym(plugin, "ditrt_plugin_run"));
    if (!run) throw ditrt::Exception(DITRT_INVALID_ARGUMENT, kind + " exports no ditrt_plugin_run");
    return ditrt::Executor::callback(run, nullptr, max_batch);
}

int progress(void*, int64_t done, int64_t total, double timestep) {
    if (done == total || done % 10 == 0) std::cerr << "step " << done << "/" << total << " (t=" << timestep << ")\n";
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc < 2 || argv[1][0] == '-') return usage("the first argument is the artifact directory");
    const std::string artifact = argv[1];
    std::string out, out_dir, latents_path, executor_kind = "tensorrt";
    std::vector<int64_t> labels;
    std::vector<std::pair<std::string, std::string>> settings;  // option key -> value
    int64_t max_batch = 0;
    int32_t device = 0;
    uint32_t flags = DITRT_OPEN_DEFAULT;
    try {
        for (int i = 2; i < argc; ++i) {
            const std::string arg = argv[i];
            if (arg == "--no-verify") {
                flags |= DITRT_OPEN_NO_VERIFY;
                continue;
            }
            if (i + 1 >= argc) return usage(arg + " needs a value");
            const std::string value = argv[++i];
            if (arg == "--labels") labels = parse_labels(value);
            else if (arg == "--sampler" || arg == "--steps" || arg == "--guidance" || arg == "--eta" || arg == "--seed" ||
                     arg == "--atol" || arg == "--rtol")
                settings.emplace_back(arg.substr(2), value);
            else if (arg == "--cfg-scale") settings.emplace_back("cfg_scale", value);
            else if (arg == "--max-batch") max_batch = std::stoll(value);
            else if (arg == "--device") device = int32_t(std::stoi(value));
            else if (arg == "--executor") executor_kind = value;
            else if (arg == "--out") out = value;
            else if (arg == "--out-dir") out_dir = value;
            else if (arg == "--latents") latents_path = value;
            else return usage("unknown option " + arg);
        }
    } catch (const std::exception& e) {
        return usage(e.what());
    }
    if (labels.empty()) return usage("--labels is required");
    if (out.empty() && out_dir.empty() && latents_path.empty()) out = "sample.png";
    try {
        ditrt::check_abi();
        ditrt::Executor executor = make_executor(executor_kind, device, max_batch);
        ditrt::Pipeline pipeline(artifact, executor, flags);
        const bool images = !out.empty() || !out_dir.empty();
        if (images && !pipeline.has_network("decoder"))
            throw ditrt::Exception(DITRT_ARTIFACT_ERROR, artifact + " has no decoder network, so no images can be written "
                                                                    "(export with --vae DIR); write --latents FILE.npy instead");
        ditrt::Options options;
        for (const auto& [key, value] : settings) options.set(key, value);
        options.progress(progress, nullptr);
        const std::vector<float> latents = pipeline.sample(labels, &options);
        const int64_t n = int64_t(labels.size());
        if (!latents_path.empty()) {
            std::vector<int64_t> shape = pipeline.latent_shape();
            shape.insert(shape.begin(), n);
            write_npy(latents_path, latents, shape);
            std::cerr << "wrote " << latents_path << "\n";
        }
        if (images) {
            const std::vector<float> decoded = pipeline.decode(latents);
            const auto shape = pipeline.image_shape();  // (3, H, W)
            if (!out.empty()) {
                ditrt::png_write(out, ditrt::grid(decoded, n, shape[1], shape[2]));
                std::cerr << "wrote " << out << "\n";
            }
            if (!out_dir.empty()) {
                ::mkdir(out_dir.c_str(), 0755);  // an existing folder is fine; a bad one fails at the first write
                const auto each = ditrt::to_uint8(decoded, n, shape[1], shape[2]);
                for (int64_t j = 0; j < n; ++j) {
                    char name[32];
                    std::snprintf(name, sizeof name, "/%06lld.png", static_cast<long long>(j));
                    ditrt::png_write(out_dir + name, each[size_t(j)]);
                }
                std::cerr << "wrote " << n << " images to " << out_dir << "\n";
            }
        }
        return 0;
    } catch (const ditrt::Exception& e) {
        std::cerr << "error: " << e.what() << "\n";
        const ditrt_status s = e.status();
        return s == DITRT_INVALID_ARGUMENT || s == DITRT_SCHEDULE_ERROR || s == DITRT_ARTIFACT_ERROR ? 2 : 1;
    } catch (const std::exception& e) {
        std::cerr << "error: " << e.what() << "\n";
        return 1;
    }
}
