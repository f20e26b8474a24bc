// syncbatch::Error: the one exception type the library throws or stores in a failed request.
#pragma once

#include <stdexcept>
#include <string>
#include <string_view>

namespace syncbatch {

/// Why a request or a call failed. Stable values: servers map them to status codes.
enum class ErrorCode {
  kQueueFull,         ///< The submitter's queue was full and the overflow policy is Reject.
  kShutDown,          ///< The submitter was shut down before the request was accepted.
  kInvalidArgument,   ///< An option or argument was out of range; the message names it.
  kSyncFailed,        ///< The device synchronization of the request's batch threw.
  kDeadlineExceeded,  ///< The request was not started before its deadline.
  kBadRequest,        ///< The request could not be run (e.g. it cannot be stacked).
  kCancelled,         ///< The caller cancelled the request before it completed.
  kOverloaded,        ///< Refused: by the measured batch time it could not start by its deadline.
};

/// A human-readable name for `code`, e.g. "queue_full".
constexpr std::string_view to_string(ErrorCode code) noexcept {
  switch (code) {
    case ErrorCode::kQueueFull:
      return "queue_full";
    case ErrorCode::kShutDown:
      return "shut_down";
    case ErrorCode::kInvalidArgument:
      return "invalid_argument";
    case ErrorCode::kSyncFailed:
      return "sync_failed";
    case ErrorCode::kDeadlineExceeded:
      return "deadline_exceeded";
    case ErrorCode::kBadRequest:
      return "bad_request";
    case ErrorCode::kCancelled:
      return "cancelled";
    case ErrorCode::kOverloaded:
      return "overloaded";
  }
  return "unknown";
}

/// The exception syncbatch throws from its own calls, and stores in requests that the library
/// (not the model) failed. Model exceptions reach the caller unchanged, as thrown.
class Error : public std::runtime_error {
 public:
  Error(ErrorCode code, const std::string& message)
      : std::runtime_error("syncbatch: " + std::string(to_string(code)) + ": " + message),
        code_(code) {}

  /// The machine-readable reason.
  ErrorCode code() const noexcept { return code_; }

 private:
  ErrorCode code_;
};

}  // namespace syncbatch
