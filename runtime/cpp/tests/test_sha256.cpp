#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <unistd.h>

#include "error.hpp"
#include "sha256.hpp"

using ditrt_core::sha256_hex;

TEST(Sha256, KnownVectors) {  // FIPS 180-4 examples and NIST's long-message vector
    EXPECT_EQ(sha256_hex("", 0), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    EXPECT_EQ(sha256_hex("abc", 3), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    const std::string two_blocks = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
    EXPECT_EQ(sha256_hex(two_blocks.data(), two_blocks.size()),
              "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
    const std::string million(1000000, 'a');
    EXPECT_EQ(sha256_hex(million.data(), million.size()),
              "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

TEST(Sha256, PaddingBoundaries) {  // 55, 56 and 64 bytes: the length field's block edge
    EXPECT_EQ(sha256_hex(std::string(55, 'a').data(), 55), "9f4390f8d30c2dd92ec9f095b65e2b9ae9b0a925a5258e241c9f1e910f734318");
    EXPECT_EQ(sha256_hex(std::string(56, 'a').data(), 56), "b35439a4ac6f0948b6d6f9e3c6af0f5f590ce20f1bde7090ef7970686ec6738a");
    EXPECT_EQ(sha256_hex(std::string(64, 'a').data(), 64), "ffe054fe7ae0cb6dc65c3af9b61d5209f439851db43d0ba5997337df154668eb");
}

TEST(Sha256, StreamingInOddChunksEqualsOneShot) {
    std::string data;
    for (int i = 0; i < 5000; ++i) data += char(i * 31 + 7);
    ditrt_core::Sha256 h;
    for (size_t pos = 0, step = 1; pos < data.size(); pos += step, step = step * 3 % 97 + 1)
        h.update(data.data() + pos, std::min(step, data.size() - pos));
    EXPECT_EQ(ditrt_core::Sha256::hex(h.finish()), sha256_hex(data.data(), data.size()));
}

TEST(Sha256, FileDigestAndMissingFile) {
    const auto path = std::filesystem::temp_directory_path() / ("ditrt_sha_" + std::to_string(::getpid()));
    std::ofstream(path, std::ios::binary) << "abc";
    EXPECT_EQ(ditrt_core::sha256_file(path.string()), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    std::filesystem::remove(path);
    EXPECT_THROW(ditrt_core::sha256_file(path.string()), ditrt_core::Error);
}
