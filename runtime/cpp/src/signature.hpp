// Signed artifacts: the OpenSSF model-signing bundle that `ditrt sign` writes (<artifact>/model.sig,
// a Sigstore bundle holding a DSSE envelope) checked with OpenSSL, as runtime/artifact/signing.py checks it:
// the envelope's ECDSA signature over the DSSE PAE of its in-toto statement, with the caller's
// public key, then every file of the folder against the statement's sha256 list.
#pragma once

#include <string>

namespace ditrt_core {

constexpr const char* kSignatureName = "model.sig";

// PAE(type, body) = "DSSEv1 " len(type) " " type " " len(body) " " body (DSSE v1.0).
std::string dsse_pae(const std::string& payload_type, const std::string& payload);

// Throws Error(Status::Artifact) naming the problem: no signature, a bundle that does not verify
// with the PEM public key at `public_key_path` (an EC key: P-256, P-384 or P-521), or a file of
// `directory` changed, added or removed since signing. Error(Status::InvalidArgument) when the key
// file cannot be read or is not an EC public key.
void verify_signature(const std::string& directory, const std::string& public_key_path);

}  // namespace ditrt_core
