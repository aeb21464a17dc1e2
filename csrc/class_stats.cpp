// Schema and argument checks of the streaming class-statistics op.
#include "class_stats.h"

#include <torch/library.h>

#include <string>
#include <vector>

namespace fastsel {

int64_t check_class_stats_update(const at::Tensor& count, const at::Tensor& mean, const at::Tensor& m2,
                                 const at::Tensor& hidden, const at::Tensor& pool_mask, const at::Tensor& labels,
                                 const std::optional<at::Tensor>& order, const std::optional<at::Tensor>& offsets) {
  TORCH_CHECK(at::isFloatingType(hidden.scalar_type()), "fastsel: hidden must be a floating tensor, got ",
              hidden.scalar_type());
  TORCH_CHECK(hidden.dim() == 3 || hidden.dim() == 4, "fastsel: hidden must be (B, T, D) or (L, B, T, D), got ",
              hidden.sizes());
  const bool layers = hidden.dim() == 4;  // L layers of one batch: every accumulator has the leading L too
  const int64_t L = layers ? hidden.size(0) : 1, lead = layers ? 1 : 0;
  const int64_t B = hidden.size(lead), T = hidden.size(lead + 1), D = hidden.size(lead + 2);
  TORCH_CHECK(pool_mask.dim() == 2 && pool_mask.size(0) == B && pool_mask.size(1) == T,
              "fastsel: pool_mask must be (B, T) = (", B, ", ", T, "), got ", pool_mask.sizes());
  TORCH_CHECK(pool_mask.scalar_type() != at::kComplexFloat && pool_mask.scalar_type() != at::kComplexDouble,
              "fastsel: pool_mask must be bool, integer or floating");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == B, "fastsel: labels must be (B,) = (", B, ",), got ",
              labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong, "fastsel: labels must be int64, got ", labels.scalar_type());
  TORCH_CHECK(count.scalar_type() == at::kDouble, "fastsel: count must be float64, got ", count.scalar_type());
  TORCH_CHECK(mean.scalar_type() == at::kDouble || mean.scalar_type() == at::kFloat,
              "fastsel: mean must be float64 or float32, got ", mean.scalar_type());
  TORCH_CHECK(m2.scalar_type() == mean.scalar_type(), "fastsel: m2 and mean must have the same dtype, got ",
              m2.scalar_type(), " and ", mean.scalar_type());
  TORCH_CHECK(count.dim() == 1 + lead && (!layers || count.size(0) == L), "fastsel: count must be ",
              layers ? "(L, C) with L = " + std::to_string(L) + " (hidden is (L, B, T, D))" : "(C,)", ", got ",
              count.sizes());
  const int64_t C = count.size(lead);
  TORCH_CHECK(C >= 1, "fastsel: count must have at least one class");
  const auto lead_dims = [&](std::initializer_list<int64_t> rest) {
    std::vector<int64_t> v;
    if (layers) v.push_back(L);
    v.insert(v.end(), rest);
    return v;
  };
  TORCH_CHECK(mean.sizes() == at::IntArrayRef(lead_dims({C, D})), "fastsel: mean must be ",
              layers ? "(L, C, D)" : "(C, D)", " = ", at::IntArrayRef(lead_dims({C, D})), ", got ", mean.sizes());
  TORCH_CHECK(m2.sizes() == at::IntArrayRef(lead_dims({C, D, D})), "fastsel: m2 must be ",
              layers ? "(L, C, D, D)" : "(C, D, D)", " = ", at::IntArrayRef(lead_dims({C, D, D})), ", got ",
              m2.sizes());
  for (const at::Tensor* t : {&count, &mean, &m2})
    TORCH_CHECK(t->is_contiguous(), "fastsel: the accumulators (count, mean, m2) must be contiguous");
  for (const at::Tensor* t : {&count, &mean, &m2, &pool_mask, &labels})
    TORCH_CHECK(t->device() == hidden.device(), "fastsel: all tensors must be on ", hidden.device(), ", got one on ",
                t->device());
  TORCH_CHECK(order.has_value() == offsets.has_value(), "fastsel: order and offsets (the class grouping) go together");
  if (order.has_value()) {
    TORCH_CHECK(order->scalar_type() == at::kLong && order->dim() == 1 && order->size(0) == B,
                "fastsel: order must be int64 (B,) = (", B, ",), got ", order->scalar_type(), " ", order->sizes());
    TORCH_CHECK(offsets->scalar_type() == at::kLong && offsets->dim() == 1 && offsets->size(0) == C + 1,
                "fastsel: offsets must be int64 (C + 1,) = (", C + 1, ",), got ", offsets->scalar_type(), " ",
                offsets->sizes());
    for (const at::Tensor* t : {&*order, &*offsets})
      TORCH_CHECK(t->device() == hidden.device(), "fastsel: all tensors must be on ", hidden.device(),
                  ", got one on ", t->device());
  }
  return L;
}

void check_class_stats_pool(const at::Tensor& pooled, const at::Tensor& hidden, const at::Tensor& pool_mask) {
  TORCH_CHECK(at::isFloatingType(hidden.scalar_type()) && hidden.dim() == 3,
              "fastsel: hidden must be a floating (B, T, D) tensor, got ", hidden.scalar_type(), " ", hidden.sizes());
  const int64_t B = hidden.size(0), T = hidden.size(1), D = hidden.size(2);
  TORCH_CHECK(pool_mask.dim() == 2 && pool_mask.size(0) == B && pool_mask.size(1) == T,
              "fastsel: pool_mask must be (B, T) = (", B, ", ", T, "), got ", pool_mask.sizes());
  TORCH_CHECK(pool_mask.scalar_type() != at::kComplexFloat && pool_mask.scalar_type() != at::kComplexDouble,
              "fastsel: pool_mask must be bool, integer or floating");
  TORCH_CHECK(pooled.scalar_type() == at::kDouble || pooled.scalar_type() == at::kFloat,
              "fastsel: pooled must be float64 or float32, got ", pooled.scalar_type());
  TORCH_CHECK(pooled.dim() == 2 && pooled.size(0) == B && pooled.size(1) == D, "fastsel: pooled must be (B, D) = (",
              B, ", ", D, "), got ", pooled.sizes());
  TORCH_CHECK(pooled.is_contiguous(), "fastsel: pooled must be contiguous");
  for (const at::Tensor* t : {&pooled, &pool_mask})
    TORCH_CHECK(t->device() == hidden.device(), "fastsel: all tensors must be on ", hidden.device(), ", got one on ",
                t->device());
}

}  // namespace fastsel

TORCH_LIBRARY_FRAGMENT(fastsel, m) {
  // Pool hidden (B, T, D) over pool_mask (B, T) per example, then merge each class's batch statistics
  // into count (C,) f64, mean (C, D) and m2 (C, D, D) (f64 or f32) with Chan's formula. Examples with
  // an empty pool_mask row are skipped. labels (B,) int64 in [0, C). order (B,), offsets (C + 1,): the examples
  // grouped by class, computed once per batch by the caller (optional; the results do not depend on them).
  // With a leading L on count, mean, m2 and hidden: L layers of one batch in one call (the layers independent).
  m.def("class_stats_update(Tensor(a!) count, Tensor(b!) mean, Tensor(c!) m2, Tensor hidden, Tensor pool_mask, "
        "Tensor labels, Tensor? order=None, Tensor? offsets=None) -> ()");
  // pooled (B, D) = hidden (B, T, D) averaged over each example's pooled tokens (pool_mask (B, T) nonzero), in
  // pooled's dtype (float32 or float64); 0 for an example without a pooled token. The first stage of
  // class_stats_update alone: one layer's states pooled as the forward makes them, so that a batch's layers can be
  // merged by one class_stats_update of (L, B, 1, D) without holding their hidden states.
  m.def("class_stats_pool(Tensor(a!) pooled, Tensor hidden, Tensor pool_mask) -> ()");
}
