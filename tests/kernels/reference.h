// Test-only references for the sparge ops: a float64 dense masked attention built from a block
// LUT (forward and, through autograd, all three gradients), per-query-block float32/64 references
// for long sequences, structured "real-looking" Q/K, and error metrics. Not thread-safe (autograd).
#pragma once

#include <cstdint>
#include <vector>

#include <ATen/ATen.h>

namespace sparge::testing {

// Block keep matrix [B, H, Nq, Nk] (bool) from an ascending LUT with -1 padding.
at::Tensor KeepFromLut(const at::Tensor& counts, const at::Tensor& indices);

struct DenseRef {
  at::Tensor o, lse, dq, dk, dv;  // o/dq/dk/dv [B, L, H, D] float64; lse [B, H, L]
};

// Dense float64 masked attention; gradients computed when grad_o is defined.
DenseRef DenseMaskedReference(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& grad_o, const at::Tensor& counts,
                              const at::Tensor& indices, int64_t block_q, int64_t block_k,
                              double scale);

// Reference for one (b, h, query block i) over its kept key blocks, float64 on q's device.
struct BlockRef {
  at::Tensor o, lse, dq;  // rows of the query block
  at::Tensor keys;        // token indices of the kept keys (int64)
  at::Tensor dk, dv;      // contributions of this query block to dK/dV at `keys`
};
BlockRef QueryBlockReference(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& grad_o, const at::Tensor& counts_cpu,
                             const at::Tensor& indices_cpu, int64_t b, int64_t h, int64_t i,
                             int64_t block_q, int64_t block_k, double scale);

// Q and K with block-scale structure (smooth along the sequence, a shared "sink" direction, plus
// noise), so pooled scores are peaked on some rows and flat on others, like DiT activations.
std::pair<at::Tensor, at::Tensor> StructuredQK(int64_t B, int64_t L, int64_t H, int64_t D,
                                               at::ScalarType dtype, at::Device device,
                                               uint64_t seed);

// ||a - b|| / ||b|| in float64.
double RelErr(const at::Tensor& a, const at::Tensor& b);

}  // namespace sparge::testing
