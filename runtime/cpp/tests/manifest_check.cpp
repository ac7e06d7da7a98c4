// ditrt_manifest_check MUTANTS WORKDIR: the C++ reader's verdict on many manifests in one process
// (tests/test_cpp_runtime.py: the fuzz under ASan + UBSan and the differential test against the
// Python reader). MUTANTS holds records (8-byte little-endian length, then the manifest bytes);
// each is written to WORKDIR/manifest.json and opened with ditrt_open through the C ABI, never
// sampled. One output line per record: the status, a tab, the message (newlines and tabs escaped).
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include "ditrt/ditrt.h"

namespace {

int never_run(void*, const char*, const ditrt_tensor*, int64_t, const ditrt_tensor*, int64_t) { return 1; }

std::string escaped(const char* message) {
    std::string out;
    for (const char* c = message; *c; ++c) {
        if (*c == '\n') out += "\\n";
        else if (*c == '\t') out += "\\t";
        else if (*c == '\\') out += "\\\\";
        else out += *c;
    }
    return out;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 3) {
        std::cerr << "usage: ditrt_manifest_check MUTANTS WORKDIR\n";
        return 2;
    }
    std::ifstream in(argv[1], std::ios::binary);
    const std::string dir = argv[2], path = dir + "/manifest.json";
    ditrt_executor* executor = nullptr;
    if (ditrt_executor_create_callback(never_run, nullptr, 0, &executor) != DITRT_OK) return 3;
    std::string text;
    for (uint64_t size = 0; in.read(reinterpret_cast<char*>(&size), 8);) {
        text.resize(size);
        if (!in.read(&text[0], std::streamsize(size))) return 4;
        {
            std::ofstream out(path, std::ios::binary | std::ios::trunc);
            out.write(text.data(), std::streamsize(text.size()));
        }
        ditrt_pipeline* pipe = nullptr;
        const ditrt_status status = ditrt_open(dir.c_str(), executor, DITRT_OPEN_NO_VERIFY, &pipe);
        if ((status == DITRT_OK) != (pipe != nullptr)) return 5;  // a handle exactly on success
        std::cout << int(status) << '\t' << escaped(ditrt_last_error()) << '\n';
        ditrt_close(pipe);
    }
    ditrt_executor_release(executor);
    return 0;
}
