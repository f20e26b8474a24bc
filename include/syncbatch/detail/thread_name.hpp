// Names the calling thread for top -H, perf and debuggers (at most 15 characters show).
#pragma once

#include <string>

#if defined(__linux__) || defined(__APPLE__)
#include <pthread.h>
#endif

namespace syncbatch::detail {

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

}  // namespace syncbatch::detail
