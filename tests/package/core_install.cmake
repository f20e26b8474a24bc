# Configures syncbatch with the LibTorch layer off, installs it into a fresh prefix, and checks
# that the install holds the core's headers and package files but none of the LibTorch layer's.
# Arguments: SOURCE WORK GENERATOR.
file(REMOVE_RECURSE "${WORK}")
execute_process(COMMAND "${CMAKE_COMMAND}" -S "${SOURCE}" -B "${WORK}/build" -G "${GENERATOR}"
                        -DSYNCBATCH_WITH_TORCH=OFF -DSYNCBATCH_BUILD_TESTS=OFF
                        -DSYNCBATCH_BUILD_EXAMPLES=OFF -DSYNCBATCH_BUILD_BENCH=OFF
                RESULT_VARIABLE rc OUTPUT_QUIET)
if(rc)
  message(FATAL_ERROR "configuring the core alone failed: ${rc}")
endif()
execute_process(COMMAND "${CMAKE_COMMAND}" --install "${WORK}/build" --prefix "${WORK}/prefix"
                RESULT_VARIABLE rc OUTPUT_QUIET)
if(rc)
  message(FATAL_ERROR "installing the core alone failed: ${rc}")
endif()
file(GLOB_RECURSE config RELATIVE "${WORK}/prefix" "${WORK}/prefix/syncbatch-config.cmake")
if(NOT config)
  message(FATAL_ERROR "the core install lacks syncbatch-config.cmake")
endif()
foreach(expected include/syncbatch/batched_submitter.hpp include/syncbatch/syncbatch.hpp)
  if(NOT EXISTS "${WORK}/prefix/${expected}")
    message(FATAL_ERROR "the core install lacks ${expected}")
  endif()
endforeach()
file(GLOB_RECURSE torch_headers RELATIVE "${WORK}/prefix" "${WORK}/prefix/include/syncbatch/torch*")
if(torch_headers)
  message(FATAL_ERROR "the core install holds LibTorch headers: ${torch_headers}")
endif()
message(STATUS "core install: core headers present, no LibTorch headers")
file(REMOVE_RECURSE "${WORK}")
