// ditrt-sample ARTIFACT --labels 1,2 --steps 50 [--sampler ddim] [--cfg-scale 4] [--guidance official]
//              [--eta 0] [--seed 0] [--max-batch 0] [--no-verify] --out latents.npy
// Samples latents with the TensorRT executor and writes them as .npy float32 (N, C, H, W).
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "ditrt/ditrt.hpp"

namespace {

int usage(const char* message) {
    std::cerr << "error: " << message << "\n"
              << "usage: ditrt-sample ARTIFACT --labels 1,2 [--steps 50] [--sampler ddpm|ddim] [--cfg-scale 4]\n"
              << "                    [--guidance official|standard] [--eta 0] [--seed 0] [--max-batch 0]\n"
              << "                    [--no-verify] --out latents.npy\n";
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

// .npy version 1.0: magic, header length, a Python dict literal padded to 64 bytes, raw data.
void write_npy(const std::string& path, const std::vector<float>& data, const std::vector<int64_t>& shape) {
    std::string dims;
    for (int64_t d : shape) dims += std::to_string(d) + ", ";
    std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (" + dims.substr(0, dims.size() - 2) + "), }";
    header += std::string(64 - (10 + header.size() + 1) % 64, ' ') + "\n";
    std::ofstream f(path, std::ios::binary);
    const uint16_t length = uint16_t(header.size());
    f.write("\x93NUMPY\x01\x00", 8);
    f.put(char(length & 0xff)).put(char(length >> 8));
    f << header;
    f.write(reinterpret_cast<const char*>(data.data()), std::streamsize(data.size() * sizeof(float)));
    if (!f) throw std::runtime_error("cannot write " + path);
}

}  // namespace

int main(int argc, char** argv) {
    if (argc < 2 || argv[1][0] == '-') return usage("the first argument is the artifact directory");
    std::string artifact = argv[1], out, steps, sampler, guidance;
    std::vector<int64_t> labels;
    ditrt::SampleOptions options;
    int64_t max_batch = 0;
    uint32_t flags = DITRT_OPEN_DEFAULT;
    try {
        for (int i = 2; i < argc; ++i) {
            const std::string arg = argv[i];
            if (arg == "--no-verify") { flags |= DITRT_OPEN_NO_VERIFY; continue; }
            if (i + 1 >= argc) return usage((arg + " needs a value").c_str());
            const std::string value = argv[++i];
            if (arg == "--labels") labels = parse_labels(value);
            else if (arg == "--steps") steps = value;
            else if (arg == "--sampler") sampler = value;
            else if (arg == "--guidance") guidance = value;
            else if (arg == "--cfg-scale") options.cfg_scale = std::stod(value);
            else if (arg == "--eta") options.eta = std::stod(value);
            else if (arg == "--seed") options.seed = std::stoull(value);
            else if (arg == "--max-batch") max_batch = std::stoll(value);
            else if (arg == "--out") out = value;
            else return usage(("unknown option " + arg).c_str());
        }
    } catch (const std::exception& e) {
        return usage(e.what());
    }
    if (labels.empty()) return usage("--labels is required");
    if (out.empty()) return usage("--out is required");
    if (!steps.empty()) options.steps = steps.c_str();
    if (!sampler.empty()) options.sampler = sampler.c_str();
    if (!guidance.empty()) options.guidance = guidance.c_str();
    if (!ditrt_has_tensorrt()) {
        std::cerr << "ditrt-sample runs the denoiser with TensorRT, and this build has no TensorRT executor.\n"
                  << "Rebuild with -DDITRT_WITH_TENSORRT=ON on a machine with TensorRT 10/11 and CUDA, or embed\n"
                  << "the library with your own denoiser through ditrt_executor_create_callback (see README).\n";
        return 1;
    }
    try {
        ditrt::Executor executor = ditrt::Executor::tensorrt(0, max_batch);
        ditrt::Pipeline pipeline(artifact, executor, flags);
        const std::vector<float> latents = pipeline.sample(labels, options);
        std::vector<int64_t> shape = pipeline.latent_shape();
        shape.insert(shape.begin(), int64_t(labels.size()));
        write_npy(out, latents, shape);
        std::cerr << "wrote " << out << "\n";
        return 0;
    } catch (const ditrt::Exception& e) {
        std::cerr << "error: " << e.what() << "\n";
        return e.status() == DITRT_INVALID_ARGUMENT || e.status() == DITRT_SCHEDULE_ERROR ||
                       e.status() == DITRT_ARTIFACT_ERROR
                   ? 2
                   : 1;
    } catch (const std::exception& e) {
        std::cerr << "error: " << e.what() << "\n";
        return 1;
    }
}
