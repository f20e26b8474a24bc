# Installs the built syncbatch into a fresh prefix, then configures, builds and runs the consumer
# project against it through ctest --build-and-test. Arguments: BUILD_DIR PREFIX SOURCE WORK
# CTEST TORCH_DIR.
file(REMOVE_RECURSE "${PREFIX}" "${WORK}")
execute_process(COMMAND "${CMAKE_COMMAND}" --install "${BUILD_DIR}" --prefix "${PREFIX}"
                RESULT_VARIABLE rc)
if(rc)
  message(FATAL_ERROR "install into ${PREFIX} failed: ${rc}")
endif()
foreach(exe consumer consumer_core)
  execute_process(
    COMMAND "${CTEST}" --build-and-test "${SOURCE}" "${WORK}/${exe}"
            --build-generator "Unix Makefiles" --build-target ${exe}
            --build-options "-DCMAKE_PREFIX_PATH=${PREFIX}" "-DTorch_DIR=${TORCH_DIR}"
            --test-command ${exe}
    RESULT_VARIABLE rc)
  if(rc)
    message(FATAL_ERROR "the consumer ${exe} did not build or run against the install: ${rc}")
  endif()
endforeach()
