// The one error type of the server's protocols: what a request gets when it is refused.
#pragma once

#include <string>

namespace syncbatch::http {

/// A request the server refuses or cannot answer: the HTTP status and a message that names what
/// was expected and what came (quoting the client through excerpt(), text.hpp). Each protocol
/// answers it in its own format: the Open Inference Protocol as {"error": message}, /v1 as
/// text/plain.
struct ProtocolError {
  int status;
  std::string message;
};

/// A 400 ProtocolError.
inline ProtocolError bad_request(std::string message) {
  return {400, std::move(message)};
}

}  // namespace syncbatch::http
