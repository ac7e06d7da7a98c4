// SHA-256 (FIPS 180-4), small and dependency-free: artifacts are verified against the manifest's
// digests before a graph or plan is used.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>

namespace ditrt_core {

class Sha256 {
public:
    Sha256();
    void update(const void* data, size_t size);
    std::array<uint8_t, 32> finish();  // the object is spent afterwards
    static std::string hex(const std::array<uint8_t, 32>& digest);

private:
    void block(const uint8_t* p);
    std::array<uint32_t, 8> h_;
    std::array<uint8_t, 64> buf_{};
    size_t buffered_ = 0;
    uint64_t total_bytes_ = 0;
};

std::string sha256_hex(const void* data, size_t size);
// Hex digest of a file, streamed; throws ditrt_core::Error (artifact) when it cannot be read.
std::string sha256_file(const std::string& path);

}  // namespace ditrt_core
