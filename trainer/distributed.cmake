# sparge_trainer_dist: sparge-train's data parallelism (trainer/distributed.*: collectives over
# c10d's TCPStore and, in CUDA builds, ProcessGroupNCCL) and its worker launcher
# (trainer/launcher.*), plus their multi-process test. Included from trainer/CMakeLists.txt.
set(_sparge_dist_root ${CMAKE_CURRENT_LIST_DIR}/..)

add_library(sparge_trainer_dist STATIC
  ${CMAKE_CURRENT_LIST_DIR}/distributed.cc
  ${CMAKE_CURRENT_LIST_DIR}/launcher.cc)
target_include_directories(sparge_trainer_dist PUBLIC ${_sparge_dist_root})
target_link_libraries(sparge_trainer_dist PUBLIC
  sparge_torch absl::status absl::statusor absl::strings absl::str_format absl::time)
target_compile_options(sparge_trainer_dist PRIVATE -Wall -Wextra -Wno-unused-parameter)
if(SPARGE_WITH_CUDA)
  # c10d's NCCL headers are compiled only with USE_C10D_NCCL and need nccl.h, which the torch
  # wheel's NCCL dependency (nvidia-nccl) ships beside it. A private definition of this target
  # only: sparge_engine's Torch PCH must not change.
  find_path(SPARGE_NCCL_INCLUDE_DIR nccl.h
    HINTS ${SPARGE_TORCH_DIR}/../nvidia/nccl/include ${CUDAToolkit_INCLUDE_DIRS}
    REQUIRED)
  target_include_directories(sparge_trainer_dist SYSTEM PRIVATE ${SPARGE_NCCL_INCLUDE_DIR})
  target_compile_definitions(sparge_trainer_dist PRIVATE USE_C10D_NCCL=1)
endif()

# trainer_distributed_test: real multi-process runs (the test binary re-executes itself as the
# workers through LaunchWorkers), CPU collectives through the store; CUDA cases skip without
# two GPUs. Its own main() dispatches the worker mode before GoogleTest starts.
add_executable(trainer_distributed_test ${_sparge_dist_root}/tests/trainer/distributed_test.cc)
target_include_directories(trainer_distributed_test PRIVATE ${_sparge_dist_root})
target_link_libraries(trainer_distributed_test PRIVATE
  sparge_trainer_dist GTest::gtest GTest::gmock)
target_compile_options(trainer_distributed_test PRIVATE -Wall -Wextra -Wno-unused-parameter)
include(GoogleTest)
gtest_discover_tests(trainer_distributed_test DISCOVERY_TIMEOUT 120 DISCOVERY_MODE PRE_TEST
  PROPERTIES LABELS trainer TIMEOUT 120)
