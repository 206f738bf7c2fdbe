#include "engine/attention/block_selection.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/base/internal/raw_logging.h"

namespace sparge::engine {

int TopKBlockCount(float topk, int num_blocks) {
  const double n = std::ceil(static_cast<double>(topk) * num_blocks - kTopKEpsilon);
  return static_cast<int>(std::clamp<double>(n, 1.0, num_blocks));
}

void SortBlocksByProbability(absl::Span<const float> probs, absl::Span<int32_t> order) {
  ABSL_RAW_CHECK(order.size() == probs.size(), "order must match probs");
  std::iota(order.begin(), order.end(), 0);
  // A stable sort on "greater" keeps equal probabilities in index order.
  std::stable_sort(order.begin(), order.end(),
                   [&probs](int32_t a, int32_t b) { return probs[a] > probs[b]; });
}

int TopPBlockCount(absl::Span<const float> probs, absl::Span<const int32_t> order, float topp) {
  const int num_blocks = static_cast<int>(probs.size());
  // Summed in double, as the CUDA predictor and the sparge ops do, so that every implementation
  // agrees on rows whose running mass lands within float rounding of p.
  double cumulative = 0.0;
  for (int n = 1; n <= num_blocks; ++n) {
    cumulative += static_cast<double>(probs[order[n - 1]]);
    if (cumulative >= static_cast<double>(topp)) return n;
  }
  return num_blocks;
}

int KeptBlockCount(AttentionMode mode, absl::Span<const float> probs,
                   absl::Span<const int32_t> order, float topk, float topp) {
  const int num_blocks = static_cast<int>(probs.size());
  int n = num_blocks;
  switch (mode) {
    case AttentionMode::kDense:
      n = num_blocks;
      break;
    case AttentionMode::kTopK:
      n = TopKBlockCount(topk, num_blocks);
      break;
    case AttentionMode::kTopP:
      n = TopPBlockCount(probs, order, topp);
      break;
    case AttentionMode::kHybrid:
      n = std::max(TopKBlockCount(topk, num_blocks), TopPBlockCount(probs, order, topp));
      break;
  }
  return std::clamp(n, 1, num_blocks);
}

int SelectKeyBlocks(absl::Span<const float> probs, AttentionMode mode, float topk, float topp,
                    absl::Span<int32_t> scratch, absl::Span<int32_t> kept) {
  ABSL_RAW_CHECK(!probs.empty(), "empty row");
  ABSL_RAW_CHECK(scratch.size() >= probs.size(), "scratch too small");
  ABSL_RAW_CHECK(kept.size() >= probs.size(), "kept too small");
  absl::Span<int32_t> order = scratch.subspan(0, probs.size());
  SortBlocksByProbability(probs, order);
  const int n = KeptBlockCount(mode, probs, order, topk, topp);
  std::copy(order.begin(), order.begin() + n, kept.begin());
  std::sort(kept.begin(), kept.begin() + n);
  return n;
}

}  // namespace sparge::engine
