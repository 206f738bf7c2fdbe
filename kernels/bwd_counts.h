// The fused backward's counting rules, shared by its kernels and a CPU test (plain C++, no CUDA
// headers): how many 64-row query tiles a work item visits and how heavy key tiles split into
// chunks. tests/kernels/bwd_counts_test.cc checks on random masks that the items, whole or
// chunked, visit exactly the (kept 128-key tile, 64-row query tile inside L) pairs of the mask:
// the dQ reductions the fused kernel makes, and the tiles its prefetch and its LUT walk expect.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SPARGE_COUNTS_HD __host__ __device__
#else
#define SPARGE_COUNTS_HD
#endif

namespace sparge::kernels::counts {

inline constexpr int kQueryBlock = 128;  // mask query block (kTileQ)
inline constexpr int kQueryTile = 64;    // rows of the fused kernel's inner query tile
inline constexpr int kKeyTile = 128;     // keys of one work item

SPARGE_COUNTS_HD inline int Ceil(int a, int b) { return (a + b - 1) / b; }
SPARGE_COUNTS_HD inline int Min(int a, int b) { return a < b ? a : b; }

// 64-row query tiles of the kept query blocks a key tile visits (count > 0 blocks, ascending, the
// last one last_qblk): only the sequence's last block can have fewer than two inside L.
SPARGE_COUNTS_HD inline int ItemQueryTiles(int count, int last_qblk, int L) {
  const int subs = kQueryBlock / kQueryTile;
  return (count - 1) * subs + Min(subs, Ceil(L - last_qblk * kQueryBlock, kQueryTile));
}

// Query blocks of chunk j of n of a key tile kept by c: [ChunkLo(c, n, j), ChunkLo(c, n, j + 1)).
SPARGE_COUNTS_HD inline int ChunkLo(int c, int n, int j) { return static_cast<int>(int64_t(j) * c / n); }

}  // namespace sparge::kernels::counts
