#include "signature.hpp"

#include <fcntl.h>
#include <openssl/bio.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <vector>

#include "error.hpp"
#include "sha256.hpp"

namespace ditrt_core {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::json;

constexpr int64_t kMaxSignatureBytes = int64_t(16) << 20;  // runtime/artifact/signing.py MAX_SIGNATURE_BYTES
constexpr int64_t kMaxKeyBytes = int64_t(1) << 16;         // runtime/artifact/signing.py MAX_KEY_BYTES
constexpr const char* kPayloadType = "application/vnd.in-toto+json";
constexpr const char* kStatementType = "https://in-toto.io/Statement/v1";
constexpr const char* kPredicateType = "https://model_signing/signature/v1.0";

[[noreturn]] void refuse(const std::string& message) { throw Error(Status::Artifact, message); }

// A regular file of at most max_bytes, read from the descriptor that was checked (a FIFO or a
// device is refused before reading: open with O_NONBLOCK, then fstat).
std::string read_regular(const std::string& path, const std::string& what, int64_t max_bytes, Status status) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) throw Error(status, what + " " + path + ": " + std::strerror(errno));
    struct stat info {};
    if (::fstat(fd, &info) != 0 || !S_ISREG(info.st_mode) || info.st_size > max_bytes) {
        ::close(fd);
        throw Error(status, what + " " + path + " is not a regular file of at most " + std::to_string(max_bytes) + " bytes");
    }
    std::string text;
    char buffer[1 << 16];
    for (;;) {
        const ssize_t n = ::read(fd, buffer, sizeof buffer);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        text.append(buffer, size_t(n));
        if (int64_t(text.size()) > max_bytes) break;
    }
    ::close(fd);
    if (int64_t(text.size()) > max_bytes) throw Error(status, what + " " + path + " grew above " + std::to_string(max_bytes) + " bytes");
    return text;
}

// Standard base64 (RFC 4648, with padding), as the bundle's JSON holds bytes; anything else is refused.
std::string base64_decode(const std::string& text, const std::string& field) {
    auto value = [](char c) -> int {
        if (c >= 'A' && c <= 'Z') return c - 'A';
        if (c >= 'a' && c <= 'z') return c - 'a' + 26;
        if (c >= '0' && c <= '9') return c - '0' + 52;
        if (c == '+') return 62;
        if (c == '/') return 63;
        return -1;
    };
    if (text.size() % 4 != 0) refuse("model.sig: " + field + " is not base64");
    std::string out;
    for (size_t i = 0; i < text.size(); i += 4) {
        int v[4];
        int pad = 0;
        for (int k = 0; k < 4; ++k) {
            const char c = text[i + size_t(k)];
            if (c == '=' && i + 4 == text.size() && k >= 2) {
                v[k] = 0;
                ++pad;
            } else if (pad > 0 || (v[k] = value(c)) < 0) {
                refuse("model.sig: " + field + " is not base64");
            }
        }
        const uint32_t n = uint32_t(v[0]) << 18 | uint32_t(v[1]) << 12 | uint32_t(v[2]) << 6 | uint32_t(v[3]);
        out += char(n >> 16);
        if (pad < 2) out += char(n >> 8 & 0xff);
        if (pad < 1) out += char(n & 0xff);
    }
    return out;
}

const Json& field(const Json& object, const char* key, const std::string& where) {
    if (!object.is_object() || !object.contains(key)) refuse("model.sig: " + where + " has no field " + key);
    return object[key];
}

std::string string_field(const Json& object, const char* key, const std::string& where) {
    const Json& value = field(object, key, where);
    if (!value.is_string()) refuse("model.sig: " + where + "." + key + " must be a string");
    return value.get<std::string>();
}

struct KeyDeleter {
    void operator()(EVP_PKEY* key) const { EVP_PKEY_free(key); }
};
struct ContextDeleter {
    void operator()(EVP_MD_CTX* ctx) const { EVP_MD_CTX_free(ctx); }
};
struct BioDeleter {
    void operator()(BIO* bio) const { BIO_free(bio); }
};

std::unique_ptr<EVP_PKEY, KeyDeleter> load_public_key(const std::string& path) {
    const std::string pem = read_regular(path, "public key", kMaxKeyBytes, Status::InvalidArgument);
    std::unique_ptr<BIO, BioDeleter> bio(BIO_new_mem_buf(pem.data(), int(pem.size())));
    if (!bio) throw Error(Status::Internal, "out of memory");
    std::unique_ptr<EVP_PKEY, KeyDeleter> key(PEM_read_bio_PUBKEY(bio.get(), nullptr, nullptr, nullptr));
    if (!key || EVP_PKEY_base_id(key.get()) != EVP_PKEY_EC)
        throw Error(Status::InvalidArgument, "public key " + path + " is not an EC public key in PEM "
                                             "(openssl ec -in key.pem -pubout -out pub.pem)");
    return key;
}

// model-signing's hash for the key's curve: P-256 sha256, P-384 sha384, P-521 sha512.
const EVP_MD* digest_for(EVP_PKEY* key) {
    switch (EVP_PKEY_bits(key)) {
        case 256: return EVP_sha256();
        case 384: return EVP_sha384();
        case 521: return EVP_sha512();
        default: throw Error(Status::InvalidArgument, "public key: an EC key of " + std::to_string(EVP_PKEY_bits(key)) +
                                                          " bits (model-signing uses P-256, P-384 or P-521)");
    }
}

bool ecdsa_verifies(EVP_PKEY* key, const std::string& message, const std::string& der_signature) {
    std::unique_ptr<EVP_MD_CTX, ContextDeleter> ctx(EVP_MD_CTX_new());
    if (!ctx) throw Error(Status::Internal, "out of memory");
    if (EVP_DigestVerifyInit(ctx.get(), nullptr, digest_for(key), nullptr, key) != 1) return false;
    return EVP_DigestVerify(ctx.get(), reinterpret_cast<const unsigned char*>(der_signature.data()), der_signature.size(),
                            reinterpret_cast<const unsigned char*>(message.data()), message.size()) == 1;
}

std::string unhex(const std::string& hex, const std::string& name) {
    auto nibble = [&](char c) -> int {
        if (c >= '0' && c <= '9') return c - '0';
        if (c >= 'a' && c <= 'f') return c - 'a' + 10;
        refuse("model.sig: the digest of " + name + " is not 64 lowercase hex digits");
    };
    if (hex.size() != 64) refuse("model.sig: the digest of " + name + " is not 64 lowercase hex digits");
    std::string out;
    for (size_t i = 0; i < hex.size(); i += 2) out += char(nibble(hex[i]) << 4 | nibble(hex[i + 1]));
    return out;
}

// The statement's file list {name: sha256 hex}, checked against its subject (sha256 over the
// resources' raw digests, in order: model-signing's root digest) and its serialization.
std::map<std::string, std::string> signed_files(const Json& statement, std::vector<std::string>& ignored) {
    if (string_field(statement, "_type", "the statement") != kStatementType ||
        string_field(statement, "predicateType", "the statement") != kPredicateType)
        refuse("model.sig: not a model-signing statement (" + std::string(kPredicateType) + ")");
    const Json& predicate = field(statement, "predicate", "the statement");
    const Json& serialization = field(predicate, "serialization", "predicate");
    if (string_field(serialization, "method", "serialization") != "files" ||
        string_field(serialization, "hash_type", "serialization") != "sha256")
        refuse("model.sig: only the files method with sha256 is supported (ditrt sign writes it)");
    if (serialization.contains("ignore_paths")) {
        for (const Json& p : serialization["ignore_paths"]) {
            if (!p.is_string()) refuse("model.sig: serialization.ignore_paths must hold strings");
            ignored.push_back(p.get<std::string>());
        }
    }
    const Json& resources = field(predicate, "resources", "predicate");
    if (!resources.is_array()) refuse("model.sig: predicate.resources must be a list");
    std::map<std::string, std::string> files;
    Sha256 root;
    for (const Json& r : resources) {
        const std::string name = string_field(r, "name", "a resource");
        if (string_field(r, "algorithm", "resource " + name) != "sha256") refuse("model.sig: " + name + " is not sha256-hashed");
        const std::string digest = string_field(r, "digest", "resource " + name);
        const std::string raw = unhex(digest, name);
        root.update(raw.data(), raw.size());
        const fs::path path(name);
        if (name.empty() || path.is_absolute() || std::find(path.begin(), path.end(), "..") != path.end())
            refuse("model.sig: resource '" + name + "' points outside the artifact");
        files[name] = digest;
    }
    const Json& subjects = field(statement, "subject", "the statement");
    if (!subjects.is_array() || subjects.size() != 1) refuse("model.sig: the statement must have one subject");
    const std::string subject = string_field(field(subjects[0], "digest", "the subject"), "sha256", "subject.digest");
    if (Sha256::hex(root.finish()) != subject)
        refuse("model.sig: the subject's digest does not match its resources (an inconsistent statement)");
    return files;
}

bool is_ignored(const std::string& name, const std::vector<std::string>& ignored) {
    for (const std::string& p : ignored) {
        std::string prefix = p;
        while (!prefix.empty() && prefix.back() == '/') prefix.pop_back();
        if (name == prefix || name.rfind(prefix + "/", 0) == 0) return true;
    }
    return false;
}

// Every regular file under the folder, by its '/'-separated relative name; links are not followed
// (model-signing refuses them when signing: a link found now was added since).
std::map<std::string, fs::path> folder_files(const fs::path& root, std::vector<std::string>& problems) {
    std::map<std::string, fs::path> files;
    std::error_code ec;
    for (fs::recursive_directory_iterator it(root, ec), end; !ec && it != end; it.increment(ec)) {
        const std::string name = it->path().lexically_relative(root).generic_string();
        if (it->is_symlink(ec)) problems.push_back(name + ": a symbolic link, added since signing (never covered)");
        else if (it->is_regular_file(ec)) files[name] = it->path();
        else if (!it->is_directory(ec)) problems.push_back(name + ": not a regular file");
    }
    if (ec) refuse("cannot list " + root.string() + ": " + ec.message());
    return files;
}

}  // namespace

std::string dsse_pae(const std::string& payload_type, const std::string& payload) {
    return "DSSEv1 " + std::to_string(payload_type.size()) + " " + payload_type + " " + std::to_string(payload.size()) +
           " " + payload;
}

void verify_signature(const std::string& directory, const std::string& public_key_path) {
    const auto key = load_public_key(public_key_path);
    const fs::path root(directory);
    const std::string sig_path = (root / kSignatureName).string();
    struct stat info {};
    if (::lstat(sig_path.c_str(), &info) != 0)
        refuse("the artifact " + directory + " is not signed: no " + kSignatureName + " (ditrt sign ... --private-key KEY.pem)");
    Json bundle;
    try {
        bundle = Json::parse(read_regular(sig_path, "signature", kMaxSignatureBytes, Status::Artifact));
    } catch (const Json::exception& e) {
        refuse(std::string("model.sig is not a JSON bundle: ") + e.what());
    }
    const Json& envelope = field(bundle, "dsseEnvelope", "the bundle");
    const std::string payload_type = string_field(envelope, "payloadType", "dsseEnvelope");
    if (payload_type != kPayloadType) refuse("model.sig: payloadType " + payload_type + " is not " + kPayloadType);
    const std::string payload = base64_decode(string_field(envelope, "payload", "dsseEnvelope"), "dsseEnvelope.payload");
    const Json& signatures = field(envelope, "signatures", "dsseEnvelope");
    if (!signatures.is_array() || signatures.empty()) refuse("model.sig: the envelope holds no signature");
    const std::string der = base64_decode(string_field(signatures[0], "sig", "signatures[0]"), "signatures[0].sig");
    if (!ecdsa_verifies(key.get(), dsse_pae(payload_type, payload), der))
        refuse("model.sig does not verify with " + public_key_path + ": the envelope's ECDSA signature is not this "
               "key's over its statement (another key, or a changed signature or statement)");
    Json statement;
    try {
        statement = Json::parse(payload);
    } catch (const Json::exception& e) {
        refuse(std::string("model.sig: its statement is not JSON: ") + e.what());
    }
    std::vector<std::string> ignored, problems;
    const std::map<std::string, std::string> expected = signed_files(statement, ignored);
    std::map<std::string, fs::path> actual = folder_files(root, problems);
    for (auto it = actual.begin(); it != actual.end();) it = is_ignored(it->first, ignored) ? actual.erase(it) : std::next(it);
    std::set<std::string> names;
    for (const auto& [name, _] : expected) names.insert(name);
    for (const auto& [name, _] : actual) names.insert(name);
    for (const std::string& name : names) {
        const auto want = expected.find(name);
        const auto have = actual.find(name);
        if (have == actual.end()) problems.push_back(name + ": removed since signing (the signature covers it)");
        else if (want == expected.end()) problems.push_back(name + ": added since signing (the signature does not cover it)");
        else if (sha256_file(have->second.string()) != want->second)
            problems.push_back(name + ": changed since signing (sha256 differs from the signed one)");
    }
    if (!problems.empty()) {
        std::string message = "the artifact " + directory + " does not match its signature: ";
        for (size_t i = 0; i < problems.size(); ++i) message += (i ? "; " : "") + problems[i];
        refuse(message);
    }
}

}  // namespace ditrt_core
