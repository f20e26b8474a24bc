// Names the calling thread for top -H, perf and debuggers: what the submitter's workers are
// named with ("sb-worker-0"), for a server's own threads too.
#pragma once

#include <string>

#if defined(__linux__) || defined(__APPLE__)
#include <pthread.h>
#endif

namespace syncbatch {

/// Names the calling thread `name`; at most its first 15 characters show (Linux's limit).
/// Thread-safe (it names only the calling thread). Errors: none (a name that cannot be set is
/// left unset).
inline void name_this_thread(const std::string& name) noexcept {
  const std::string shown = name.substr(0, 15);  // Linux keeps 15 characters and a NUL
#if defined(__linux__)
  pthread_setname_np(pthread_self(), shown.c_str());
#elif defined(__APPLE__)
  pthread_setname_np(shown.c_str());
#else
  (void)shown;
#endif
}

}  // namespace syncbatch
