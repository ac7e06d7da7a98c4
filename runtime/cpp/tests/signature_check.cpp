// ditrt_signature_check PUBLIC_KEY DIR...: ditrt_open_signed's verdict on each artifact folder, in
// one process (tests/test_cpp_runtime.py: folders signed by the Python side, then tampered, run
// under ASan + UBSan as well). One output line per folder: the status, a tab, the message.
#include <cstdint>
#include <iostream>
#include <string>

#include "ditrt/ditrt.h"

namespace {

int never_run(void*, const char*, const ditrt_tensor*, int64_t, const ditrt_tensor*, int64_t) { return 1; }

}  // namespace

int main(int argc, char** argv) {
    if (argc < 3) {
        std::cerr << "usage: ditrt_signature_check PUBLIC_KEY DIR...\n";
        return 2;
    }
    ditrt_executor* executor = nullptr;
    if (ditrt_executor_create_callback(never_run, nullptr, 0, &executor) != DITRT_OK) return 3;
    for (int i = 2; i < argc; ++i) {
        ditrt_pipeline* pipe = nullptr;
        const ditrt_status status = ditrt_open_signed(argv[i], executor, DITRT_OPEN_DEFAULT, argv[1], &pipe);
        if ((status == DITRT_OK) != (pipe != nullptr)) return 5;  // a handle exactly on success
        std::string message = ditrt_last_error();
        for (char& c : message) c = c == '\n' || c == '\t' ? ' ' : c;
        std::cout << int(status) << '\t' << message << '\n';
        ditrt_close(pipe);
    }
    ditrt_executor_release(executor);
    return 0;
}
