// Hand-computed key-block selection (SPARSE_ATTENTION.md section 2.4) for every
// mode.
#include "engine/attention/block_selection.h"

#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace sparge::engine {
namespace {

using ::testing::ElementsAre;

std::vector<int32_t> Select(const std::vector<float>& probs, AttentionMode mode, float topk,
                            float topp) {
  std::vector<int32_t> scratch(probs.size()), kept(probs.size(), -1);
  const int n =
      SelectKeyBlocks(probs, mode, topk, topp, absl::MakeSpan(scratch), absl::MakeSpan(kept));
  return std::vector<int32_t>(kept.begin(), kept.begin() + n);
}

TEST(BlockSelectionTest, TopKCountUsesEpsilonCeilingAndClamps) {
  EXPECT_EQ(TopKBlockCount(0.3f, 10), 3);  // 0.3 * 10 is 3, not 4
  EXPECT_EQ(TopKBlockCount(0.1f, 10), 1);
  EXPECT_EQ(TopKBlockCount(0.25f, 10), 3);  // ceil(2.5)
  EXPECT_EQ(TopKBlockCount(0.01f, 10), 1);  // at least one block
  EXPECT_EQ(TopKBlockCount(1.0f, 7), 7);
  EXPECT_EQ(TopKBlockCount(0.5f, 3), 2);  // ceil(1.5)
}

TEST(BlockSelectionTest, SortIsDescendingWithLowerIndexFirstOnTies) {
  const std::vector<float> probs = {0.2f, 0.3f, 0.2f, 0.3f};
  std::vector<int32_t> order(4);
  SortBlocksByProbability(probs, absl::MakeSpan(order));
  EXPECT_THAT(order, ElementsAre(1, 3, 0, 2));
}

TEST(BlockSelectionTest, TiesAreBrokenByLowerIndex) {
  const std::vector<float> probs = {0.2f, 0.3f, 0.2f, 0.3f};
  EXPECT_THAT(Select(probs, AttentionMode::kTopK, 0.5f, 1.0f), ElementsAre(1, 3));
  EXPECT_THAT(Select(probs, AttentionMode::kTopK, 0.75f, 1.0f), ElementsAre(0, 1, 3));
  // Mass 0.3 + 0.3 = 0.6 >= 0.55 after two blocks.
  EXPECT_THAT(Select(probs, AttentionMode::kTopP, 1.0f, 0.55f), ElementsAre(1, 3));
}

// A flat row: every block holds 1/8 of the mass.
TEST(BlockSelectionTest, FlatRowTopKLosesMassHybridAddsBlocksViaP) {
  const std::vector<float> flat(8, 0.125f);
  // Top-k with k = 0.25 keeps 2 blocks = 25% of the mass.
  EXPECT_THAT(Select(flat, AttentionMode::kTopK, 0.25f, 0.5f), ElementsAre(0, 1));
  // Top-p with p = 0.5 needs 4 blocks (0.125 * 4 = 0.5).
  EXPECT_THAT(Select(flat, AttentionMode::kTopP, 0.25f, 0.5f), ElementsAre(0, 1, 2, 3));
  // Hybrid = max(n_k = 2, n_p = 4) = 4.
  EXPECT_THAT(Select(flat, AttentionMode::kHybrid, 0.25f, 0.5f), ElementsAre(0, 1, 2, 3));
  // p = 0.9: 7 blocks hold 0.875 < 0.9, so all 8 are needed.
  EXPECT_EQ(Select(flat, AttentionMode::kHybrid, 0.25f, 0.9f).size(), 8u);
}

// A peaked row: block 1 alone holds 92% of the mass.
TEST(BlockSelectionTest, PeakedRowTopPCollapsesHybridKeepsTopKFloor) {
  const std::vector<float> peaked = {0.02f, 0.92f, 0.015f, 0.015f, 0.01f, 0.01f, 0.005f, 0.005f};
  EXPECT_THAT(Select(peaked, AttentionMode::kTopP, 0.25f, 0.9f), ElementsAre(1));
  // n_k = ceil(0.375 * 8) = 3: block 1, then 0 (0.02), then 2 (0.015, lower
  // index of a tie).
  EXPECT_THAT(Select(peaked, AttentionMode::kTopK, 0.375f, 0.9f), ElementsAre(0, 1, 2));
  EXPECT_THAT(Select(peaked, AttentionMode::kHybrid, 0.375f, 0.9f), ElementsAre(0, 1, 2));
  // When p needs more than k, hybrid follows p: 0.92 + 0.02 + 0.015 = 0.955 >=
  // 0.95.
  EXPECT_THAT(Select(peaked, AttentionMode::kHybrid, 0.125f, 0.95f), ElementsAre(0, 1, 2));
}

TEST(BlockSelectionTest, DenseKeepsEveryBlock) {
  const std::vector<float> probs = {0.7f, 0.1f, 0.1f, 0.1f};
  EXPECT_THAT(Select(probs, AttentionMode::kDense, 0.01f, 0.01f), ElementsAre(0, 1, 2, 3));
}

TEST(BlockSelectionTest, TopPNeverReachedKeepsAllBlocks) {
  // In float, 0.1 * 10 summed sequentially is 1.0000001 or 0.99999994 depending
  // on order; a p slightly above the reachable sum must fall back to all
  // blocks, never to zero.
  const std::vector<float> probs(10, 0.1f);
  EXPECT_EQ(Select(probs, AttentionMode::kTopP, 1.0f, 1.5f).size(), 10u);
}

TEST(BlockSelectionTest, SingleBlockRowKeepsIt) {
  const std::vector<float> one = {1.0f};
  for (AttentionMode mode : {AttentionMode::kDense, AttentionMode::kTopK, AttentionMode::kTopP,
                             AttentionMode::kHybrid}) {
    EXPECT_THAT(Select(one, mode, 0.01f, 0.01f), ElementsAre(0)) << ToString(mode);
  }
}

TEST(BlockSelectionTest, KeptIndicesAreAscendingAndFromTheTopOfTheOrdering) {
  const std::vector<float> probs = {0.05f, 0.1f, 0.4f, 0.05f, 0.25f, 0.15f};
  // Order: 2 (0.4), 4 (0.25), 5 (0.15), 1 (0.1), 0, 3. k = 0.5 -> 3 blocks.
  EXPECT_THAT(Select(probs, AttentionMode::kTopK, 0.5f, 1.0f), ElementsAre(2, 4, 5));
  // p = 0.8: 0.4 + 0.25 + 0.15 = 0.8 (>= 0.8 in float? check both sides of the
  // boundary).
  EXPECT_THAT(Select(probs, AttentionMode::kTopP, 1.0f, 0.79f), ElementsAre(2, 4, 5));
  EXPECT_THAT(Select(probs, AttentionMode::kTopP, 1.0f, 0.81f), ElementsAre(1, 2, 4, 5));
}

}  // namespace
}  // namespace sparge::engine
