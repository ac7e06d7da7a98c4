// The one exception type inside the library; the C ABI turns it into a status and a message.
#pragma once

#include <stdexcept>
#include <string>

// The library's internals live in ditrt_core, apart from the public C++ wrapper's namespace ditrt
// (ditrt.hpp): one name for two classes (ditrt::Executor) would be an ODR violation in a program
// that links both, as the unit tests do (AddressSanitizer caught the wrapper's destructor being
// replaced by the internal one).
namespace ditrt_core {

// Mirrors ditrt_status (include/ditrt/ditrt.h); c_api.cpp static_asserts the values match.
enum class Status { Ok = 0, InvalidArgument = 1, Artifact = 2, Schedule = 3, BufferTooSmall = 4, Executor = 5,
                    Unavailable = 6, Internal = 7, Cancelled = 8, Step = 9, Busy = 10, Io = 11 };

class Error : public std::runtime_error {
public:
    Error(Status status, const std::string& message) : std::runtime_error(message), status_(status) {}
    Status status() const { return status_; }

private:
    Status status_;
};

}  // namespace ditrt_core
