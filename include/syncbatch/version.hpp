// syncbatch version: the single source of truth. CMakeLists.txt reads these macros.
#pragma once

#define SYNCBATCH_VERSION_MAJOR 0
#define SYNCBATCH_VERSION_MINOR 1
#define SYNCBATCH_VERSION_PATCH 0

#define SYNCBATCH_VERSION \
  (SYNCBATCH_VERSION_MAJOR * 10000 + SYNCBATCH_VERSION_MINOR * 100 + SYNCBATCH_VERSION_PATCH)
