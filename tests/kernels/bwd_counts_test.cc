// The fused backward's counting rules (kernels/bwd_counts.h) on random masks: the 64-row query
// tiles the work items visit, whole or split into chunks, are exactly the (kept 128-key tile,
// query tile inside L) pairs of the mask, counted independently per query block. Plain C++: runs
// everywhere.
#include "kernels/bwd_counts.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <string>
#include <vector>

namespace sparge::kernels::counts {
namespace {

// One head's mask: keep[qb][kb] over 128-row query blocks and block_k-wide key blocks of L.
struct Mask {
  int L, block_k, nq, nk;
  std::vector<std::vector<int32_t>> rows;  // kept key blocks per query block, ascending
  std::vector<std::vector<int32_t>> cols;  // keeping query blocks per key block, ascending
};

Mask RandomMask(int L, int block_k, double density, bool empty_head, std::mt19937* rng) {
  Mask m{L, block_k, Ceil(L, kQueryBlock), Ceil(L, block_k), {}, {}};
  m.rows.resize(m.nq);
  m.cols.resize(m.nk);
  std::bernoulli_distribution keep(density);
  for (int qb = 0; qb < m.nq; ++qb) {
    for (int kb = 0; kb < m.nk; ++kb) {
      // A sink (key block 0) kept by most rows, the last (partial) key block by every row,
      // query block 1 keeping nothing, the rest random.
      const bool k = !empty_head && qb != 1 && (kb == m.nk - 1 || (kb == 0 && qb % 5 != 0) || keep(*rng));
      if (k) {
        m.rows[qb].push_back(kb);
        m.cols[kb].push_back(qb);
      }
    }
  }
  return m;
}

// The reference count, per query block: its kept 128-key tiles (block_k / 128 per kept key block,
// fewer for a last block past L; c kept blocks, indices idx ascending) times its 64-row tiles
// inside L.
int QueryBlockPairs(int c, const int32_t* idx, int block_k, int L, int qb) {
  const int per = block_k / kKeyTile, nkt = Ceil(L, kKeyTile);
  int tiles = 0;
  for (int j = 0; j < c; ++j) tiles += Min(per, nkt - idx[j] * per);
  return tiles * Min(kQueryBlock / kQueryTile, Ceil(L - qb * kQueryBlock, kQueryTile));
}

// Twice (one dQ reduction per warpgroup and pair) the sum over the head's query blocks.
int64_t Target(const Mask& m) {
  int64_t sum = 0;
  for (int qb = 0; qb < m.nq; ++qb)
    sum += QueryBlockPairs(static_cast<int>(m.rows[qb].size()), m.rows[qb].data(), m.block_k, m.L, qb);
  return 2 * sum;
}

// The reductions the fused kernel's items make: one per warpgroup and visited 64-row query tile,
// for every 128-key tile inside L, whole or in chunks of at most `chunk` query blocks.
int64_t ItemReductions(const Mask& m, int chunk) {
  int64_t sum = 0;
  const int nkt = Ceil(m.L, kKeyTile);
  for (int kt = 0; kt < nkt; ++kt) {
    const std::vector<int32_t>& t = m.cols[kt * kKeyTile / m.block_k];
    const int c = static_cast<int>(t.size());
    if (c == 0) continue;
    const int n = chunk > 0 ? Ceil(c, chunk) : 1;
    for (int j = 0; j < n; ++j) {
      const int lo = ChunkLo(c, n, j), cc = ChunkLo(c, n, j + 1) - lo;
      if (cc > 0) sum += 2 * ItemQueryTiles(cc, t[lo + cc - 1], m.L);
    }
  }
  return sum;
}

TEST(BwdCounts, ItemsVisitExactlyTheMasksPairs) {
  std::mt19937 rng(7);
  // Lengths around block and tile edges (1, 63, 64, 65, 127, 128, 129, 255, 256, 257, ...) and
  // the Wan shapes' 32760 and 75600 (a last query block of 120 / 80 rows).
  const int lengths[] = {1, 63, 64, 65, 127, 128, 129, 191, 192, 193, 255, 256, 257, 1000, 2333, 5000, 32760, 75600};
  int checked = 0;
  for (int L : lengths) {
    for (int block_k : {128, 256, 512}) {
      for (double density : {0.02, 0.3, 1.0}) {
        for (int chunk : {0, 1, 3, 32}) {
          if (L > 10000 && (density > 0.5 || chunk == 1)) continue;  // keep the test fast
          const Mask m = RandomMask(L, block_k, density, /*empty_head=*/false, &rng);
          const std::string what = "L=" + std::to_string(L) + " block_k=" + std::to_string(block_k) +
                                   " density=" + std::to_string(density) + " chunk=" + std::to_string(chunk);
          EXPECT_EQ(Target(m), ItemReductions(m, chunk)) << what;
          EXPECT_GT(Target(m), 0) << what;
          ++checked;
        }
      }
    }
  }
  EXPECT_GT(checked, 150);
}

TEST(BwdCounts, EmptyHeadHasTargetZero) {
  std::mt19937 rng(3);
  for (int L : {1, 129, 5000}) {
    const Mask m = RandomMask(L, 128, 0.3, /*empty_head=*/true, &rng);
    EXPECT_EQ(Target(m), 0) << L;
    EXPECT_EQ(ItemReductions(m, 0), 0) << L;
  }
}

TEST(BwdCounts, ItemQueryTilesCountsOnlyTilesInsideL) {
  // A key tile kept by query blocks 0..3 of L = 449 (blocks of 128: the last one holds 65 rows,
  // so both of its 64-row tiles start inside L) and of L = 420 (36 rows: one tile).
  EXPECT_EQ(ItemQueryTiles(4, 3, 449), 8);
  EXPECT_EQ(ItemQueryTiles(4, 3, 420), 7);
  EXPECT_EQ(ItemQueryTiles(1, 0, 1), 1);
  // Chunks cover [0, c) without gaps or overlaps.
  for (int c : {1, 5, 31, 32, 33, 100})
    for (int n = 1; n <= c; n += 3) {
      EXPECT_EQ(ChunkLo(c, n, 0), 0);
      EXPECT_EQ(ChunkLo(c, n, n), c);
      for (int j = 0; j < n; ++j) EXPECT_LE(ChunkLo(c, n, j), ChunkLo(c, n, j + 1));
    }
}

TEST(BwdCounts, ReferenceCountsKeyTilesOfWideBlocks) {
  // block_k = 256 over L = 300: key tiles 0, 1 (block 0) and 2 (block 1, its second tile past L).
  const int32_t both[] = {0, 1};
  EXPECT_EQ(QueryBlockPairs(2, both, 256, 300, 0), 3 * 2);  // 3 key tiles x 2 query tiles
  EXPECT_EQ(QueryBlockPairs(2, both, 256, 300, 2), 3 * 1);  // the last block: 44 rows, 1 tile
  const int32_t last[] = {1};
  EXPECT_EQ(QueryBlockPairs(1, last, 256, 300, 1), 1 * 2);
  EXPECT_EQ(QueryBlockPairs(0, nullptr, 128, 300, 0), 0);
}

}  // namespace
}  // namespace sparge::kernels::counts
