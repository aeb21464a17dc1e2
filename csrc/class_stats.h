// Streaming per-class statistics of pooled hidden states (the variability ratio of Xie et al. 2022).
//
// class_stats_update pools each example's hidden states (masked mean over its pooled tokens), groups
// the pooled vectors by label and merges each class's batch (count, mean, scatter) into the running
// (count, mean, m2) with Chan's parallel formula:
//   n = n_a + n_b,  delta = mean_b - mean_a,
//   mean = mean_a + delta * n_b / n,   m2 = m2_a + S_b + delta delta^T * n_a n_b / n,
// where S_b = sum_{b in class} (x_b - mean_b)(x_b - mean_b)^T is centred on the batch mean, so nothing
// is ever computed as a difference of large raw moments. Examples without any pooled token are
// skipped (they have no sequence state); the caller counts them from pool_mask if it cares.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>

namespace fastsel {

// Validate arguments (shared by every backend). Throws c10::Error with a readable message. order (B,) and offsets
// (C + 1,) int64: the batch's examples grouped by class (class_grouping in fastsel/ops/class_stats.py), given
// together or not at all; the CUDA kernel then skips its own grouping (the same for every layer of a batch).
// Either one layer (count (C,), mean (C, D), m2 (C, D, D), hidden (B, T, D)) or L layers of one batch, each of the
// four with a leading L (count (L, C), ..., hidden (L, B, T, D)); pool_mask, labels and the grouping are the batch's.
// Returns L (1 without the leading dimension).
int64_t check_class_stats_update(const at::Tensor& count, const at::Tensor& mean, const at::Tensor& m2,
                                 const at::Tensor& hidden, const at::Tensor& pool_mask, const at::Tensor& labels,
                                 const std::optional<at::Tensor>& order, const std::optional<at::Tensor>& offsets);

// class_stats_pool: pooled (B, D) float32/float64 contiguous, hidden (B, T, D) floating, pool_mask (B, T).
void check_class_stats_pool(const at::Tensor& pooled, const at::Tensor& hidden, const at::Tensor& pool_mask);

}  // namespace fastsel
