# Installs the server component alone into a fresh prefix, as the Dockerfile does, and runs the
# installed program (--help: its flags, exit 0). Arguments: BUILD_DIR PREFIX.
file(REMOVE_RECURSE "${PREFIX}")
execute_process(COMMAND "${CMAKE_COMMAND}" --install "${BUILD_DIR}" --component server
                        --prefix "${PREFIX}" RESULT_VARIABLE rc)
if(rc)
  message(FATAL_ERROR "install of the server component into ${PREFIX} failed: ${rc}")
endif()
file(GLOB_RECURSE installed RELATIVE "${PREFIX}" "${PREFIX}/*")
if(NOT installed STREQUAL "bin/http_server")
  message(FATAL_ERROR "expected the server component to install bin/http_server alone, got: "
                      "${installed}")
endif()
execute_process(COMMAND "${PREFIX}/bin/http_server" --help RESULT_VARIABLE rc
                ERROR_VARIABLE usage)
if(rc OR NOT usage MATCHES "--max-connections")
  message(FATAL_ERROR "the installed http_server --help: exit ${rc}, printed: ${usage}")
endif()
message(STATUS "installed and ran ${PREFIX}/bin/http_server")
