# Compiles SOURCE twice with CXX: with -DSYNCBATCH_CF_GOOD it must compile (the harness and the
# good variant are sound), without it it must fail, and the compiler's message must match
# EXPECT (the concept that refused it). Arguments: CXX SOURCE INCLUDES (;-list) EXPECT.
set(flags -std=c++20 -fsyntax-only)
foreach(dir ${INCLUDES})
  list(APPEND flags -I${dir})
endforeach()
execute_process(COMMAND ${CXX} ${flags} -DSYNCBATCH_CF_GOOD ${SOURCE}
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "the good variant of ${SOURCE} does not compile:\n${out}")
endif()
execute_process(COMMAND ${CXX} ${flags} ${SOURCE}
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
if(rc EQUAL 0)
  message(FATAL_ERROR "${SOURCE} compiled, but it must be refused")
endif()
if(NOT out MATCHES "${EXPECT}")
  message(FATAL_ERROR "${SOURCE} was refused, but not by '${EXPECT}':\n${out}")
endif()
string(REGEX MATCH "[^\n]*${EXPECT}[^\n]*" line "${out}")
message(STATUS "refused as expected: ${line}")
