# Link feature: keep a shared library whose only job is to register things at load time.
set(CMAKE_LINK_LIBRARY_USING_SPARGE_NO_AS_NEEDED "LINKER:--push-state,--no-as-needed" "<LINK_ITEM>" "LINKER:--pop-state")
set(CMAKE_LINK_LIBRARY_USING_SPARGE_NO_AS_NEEDED_SUPPORTED TRUE)

# Small helpers that keep each folder's CMakeLists short (after Abseil's absl_cc_library).

# Locate LibTorch inside the project venv's torch wheel (or $SPARGE_PYTHON / python3).
# The wheel is built with CUDA; on a CPU-only build we link only torch_cpu and c10 so that
# nothing needs a GPU at run time, and we skip Torch's CUDA detection entirely.
macro(sparge_find_torch)
  if(NOT SPARGE_PYTHON)
    if(EXISTS ${CMAKE_SOURCE_DIR}/.venv/bin/python)
      set(SPARGE_PYTHON ${CMAKE_SOURCE_DIR}/.venv/bin/python)
    else()
      find_program(SPARGE_PYTHON NAMES python3 python REQUIRED)
    endif()
  endif()
  execute_process(
    COMMAND ${SPARGE_PYTHON} -c "import torch, os; print(os.path.dirname(torch.__file__))"
    OUTPUT_VARIABLE SPARGE_TORCH_DIR OUTPUT_STRIP_TRAILING_WHITESPACE
    RESULT_VARIABLE _torch_rc)
  if(NOT _torch_rc EQUAL 0)
    message(FATAL_ERROR "torch not importable by ${SPARGE_PYTHON}; run scripts/setup.sh")
  endif()
  message(STATUS "SpargeServe: LibTorch from ${SPARGE_TORCH_DIR}")
  if(SPARGE_WITH_CUDA)
    list(APPEND CMAKE_PREFIX_PATH ${SPARGE_TORCH_DIR}/share/cmake)
    find_package(Torch REQUIRED)
    add_library(sparge_torch INTERFACE)
    target_link_libraries(sparge_torch INTERFACE ${TORCH_LIBRARIES})
    target_include_directories(sparge_torch INTERFACE ${TORCH_INCLUDE_DIRS})
    target_compile_definitions(sparge_torch INTERFACE SPARGE_WITH_CUDA=1)
  else()
    add_library(sparge_torch INTERFACE)
    target_include_directories(sparge_torch SYSTEM INTERFACE
      ${SPARGE_TORCH_DIR}/include
      ${SPARGE_TORCH_DIR}/include/torch/csrc/api/include)
    target_link_libraries(sparge_torch INTERFACE
      ${SPARGE_TORCH_DIR}/lib/libtorch_cpu.so ${SPARGE_TORCH_DIR}/lib/libc10.so)
    target_compile_definitions(sparge_torch INTERFACE _GLIBCXX_USE_CXX11_ABI=1)
    target_link_options(sparge_torch INTERFACE "LINKER:-rpath,${SPARGE_TORCH_DIR}/lib")
  endif()
endmacro()

# sparge_cc_library(NAME name SRCS ... DEPS ... [HDRS ...])
function(sparge_cc_library)
  cmake_parse_arguments(A "" "NAME" "SRCS;DEPS;HDRS" ${ARGN})
  add_library(${A_NAME} ${A_SRCS} ${A_HDRS})
  target_include_directories(${A_NAME} PUBLIC ${CMAKE_SOURCE_DIR} ${CMAKE_BINARY_DIR})
  target_link_libraries(${A_NAME} PUBLIC ${A_DEPS})
  target_compile_options(${A_NAME} PRIVATE
    $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wno-unused-parameter>)
endfunction()

# sparge_cc_binary(NAME name SRCS ... DEPS ...)
function(sparge_cc_binary)
  cmake_parse_arguments(A "" "NAME" "SRCS;DEPS" ${ARGN})
  add_executable(${A_NAME} ${A_SRCS})
  target_include_directories(${A_NAME} PRIVATE ${CMAKE_SOURCE_DIR} ${CMAKE_BINARY_DIR})
  target_link_libraries(${A_NAME} PRIVATE ${A_DEPS})
  target_compile_options(${A_NAME} PRIVATE -Wall -Wextra -Wno-unused-parameter)
endfunction()

# sparge_cc_test(NAME name SRCS ... DEPS ... [LABELS ...]): a GoogleTest binary registered with ctest.
function(sparge_cc_test)
  cmake_parse_arguments(A "" "NAME" "SRCS;DEPS;LABELS" ${ARGN})
  add_executable(${A_NAME} ${A_SRCS})
  target_include_directories(${A_NAME} PRIVATE ${CMAKE_SOURCE_DIR} ${CMAKE_BINARY_DIR})
  target_link_libraries(${A_NAME} PRIVATE ${A_DEPS} GTest::gtest GTest::gmock GTest::gtest_main)
  include(GoogleTest)
  gtest_discover_tests(${A_NAME} DISCOVERY_TIMEOUT 120 DISCOVERY_MODE PRE_TEST
    PROPERTIES LABELS "${A_LABELS}" ENVIRONMENT "SPARGE_SOURCE_DIR=${CMAKE_SOURCE_DIR}")
endfunction()

# sparge_py_test(NAME name FILE test.py LABELS ... [TIMEOUT s] [ENV VAR=value ...]): a pytest file
# run by ctest with the project venv's interpreter (scripts/setup.sh makes .venv), from the
# current binary directory, with SPARGE_SOURCE_DIR set. Registers nothing when .venv is missing.
function(sparge_py_test)
  cmake_parse_arguments(A "" "NAME;FILE;TIMEOUT" "LABELS;ENV" ${ARGN})
  set(_python ${CMAKE_SOURCE_DIR}/.venv/bin/python)
  if(NOT EXISTS ${_python})
    return()
  endif()
  if(NOT A_TIMEOUT)
    set(A_TIMEOUT 600)
  endif()
  add_test(NAME ${A_NAME}
    COMMAND ${_python} -m pytest -q -p no:cacheprovider ${CMAKE_CURRENT_SOURCE_DIR}/${A_FILE}
    WORKING_DIRECTORY ${CMAKE_CURRENT_BINARY_DIR})
  set_tests_properties(${A_NAME} PROPERTIES LABELS "${A_LABELS}" TIMEOUT ${A_TIMEOUT}
    ENVIRONMENT "SPARGE_SOURCE_DIR=${CMAKE_SOURCE_DIR};${A_ENV}")
endfunction()
