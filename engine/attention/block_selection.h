// SpargeAttention2 key-block selection for one query-block row
// (shared/design/SPARSE_ATTENTION.md section 2.4): given the row's pooled block
// probabilities, which key blocks are kept. Usage: int n =
// SelectKeyBlocks(probs, AttentionMode::kHybrid, 0.1f, 0.9f, kept); Torch-free
// pure functions; thread-safe. The CUDA mask kernels must agree with these
// exactly.
#pragma once

#include <cstdint>

#include "absl/types/span.h"
#include "engine/pipeline.h"

namespace sparge::engine {

// Tolerance subtracted before the Top-k ceiling so that exact products (0.3 *
// 10) give 3, not 4.
inline constexpr double kTopKEpsilon = 1e-6;

// n_k = ceil(topk * num_blocks - 1e-6), clamped to [1, num_blocks].
int TopKBlockCount(float topk, int num_blocks);

// Orders block indices by probability, descending; ties keep the lower index
// first. `order` must have probs.size() entries.
void SortBlocksByProbability(absl::Span<const float> probs, absl::Span<int32_t> order);

// n_p = smallest n with sum of the n largest probabilities >= topp (summed in
// float, in sorted order), clamped to [1, num_blocks]; num_blocks when rounding
// keeps the sum below topp.
int TopPBlockCount(absl::Span<const float> probs, absl::Span<const int32_t> order, float topp);

// How many of the best blocks `mode` keeps: DENSE all, TOPK n_k, TOPP n_p,
// HYBRID max(n_k, n_p); always within [1, num_blocks].
int KeptBlockCount(AttentionMode mode, absl::Span<const float> probs,
                   absl::Span<const int32_t> order, float topk, float topp);

// Selects the kept key blocks of one row. Writes their indices in ascending
// index order to kept[0..n) and returns n. `kept` and `scratch` must each hold
// probs.size() entries (probs must be non-empty).
int SelectKeyBlocks(absl::Span<const float> probs, AttentionMode mode, float topk, float topp,
                    absl::Span<int32_t> scratch, absl::Span<int32_t> kept);

}  // namespace sparge::engine
