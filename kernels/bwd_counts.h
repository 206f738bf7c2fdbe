// The fused backward's counting rules, shared by its kernels and a CPU test (plain C++, no CUDA
// headers): how many 64-row query tiles a work item visits, how heavy key tiles split into
// chunks, and how many dQ bulk reductions a query block receives. SPARGE_BWD_FUSED_DQ=1 waits
// for each head's count to reach its target, so the target (QueryBlockReductions summed over the
// head) must equal the reductions the items make (ItemQueryTiles summed over the head's items,
// chunked or whole): a mismatch would hang the kernel. tests/kernels/bwd_counts_test.cc checks
// the identity on random masks.
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

// dQ reductions of query block qb per warpgroup: its kept 128-key tiles (block_k / 128 per kept
// key block, fewer for a last block past L; c kept blocks, indices idx ascending) times its
// 64-row tiles inside L. The head's target is twice the sum over its query blocks (one reduction
// per warpgroup and tile).
SPARGE_COUNTS_HD inline int QueryBlockReductions(int c, const int32_t* idx, int block_k, int L, int qb) {
  const int per = block_k / kKeyTile, nkt = Ceil(L, kKeyTile);
  int tiles = c;
  if (per != 1) {
    tiles = 0;
    for (int j = 0; j < c; ++j) tiles += Min(per, nkt - idx[j] * per);
  }
  return tiles * Min(kQueryBlock / kQueryTile, Ceil(L - qb * kQueryBlock, kQueryTile));
}

}  // namespace sparge::kernels::counts
