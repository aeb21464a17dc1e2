// CPU kernels of class_stats_update (one layer, or L layers of one batch) and class_stats_pool (semantics:
// fastsel/ops/class_stats.py class_stats_update_ref, class_stats_pool_ref).
//
// Pooling is one parallel pass over the batch (threads own examples, so no two threads write the same
// row); each class's batch scatter is one GEMM of its centred pooled rows, merged with Chan's formula.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "class_stats.h"

namespace fastsel {
namespace {

// pooled (N, D) = masked mean over t of h (N, T, D), row b masked by mask row b % B (N = L * B: the layers' rows
// one after another, one (B, T) mask); ntok[b] = number of pooled tokens of row b.
template <typename acc_t>
void masked_mean_pool(const acc_t* h, const uint8_t* mask, acc_t* pooled, int64_t* ntok, int64_t N, int64_t B,
                      int64_t T, int64_t D) {
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      acc_t* row = pooled + b * D;
      const uint8_t* mrow = mask + (b % B) * T;
      for (int64_t d = 0; d < D; ++d) row[d] = acc_t(0);
      int64_t n = 0;
      for (int64_t t = 0; t < T; ++t) {
        if (!mrow[t]) continue;
        const acc_t* src = h + (b * T + t) * D;
        for (int64_t d = 0; d < D; ++d) row[d] += src[d];
        ++n;
      }
      if (n > 0) {
        const acc_t inv = acc_t(1) / acc_t(n);
        for (int64_t d = 0; d < D; ++d) row[d] *= inv;
      }
      ntok[b] = n;
    }
  });
}

// pooled (N, D) contiguous, float or double: the masked means of hidden's N = L * B rows ((B, T, D) or (L, B, T, D), any
// float dtype, summed in pooled's dtype) under pool_mask (B, T); returns each row's pooled-token count.
std::vector<int64_t> pool_rows(const at::Tensor& pooled, const at::Tensor& hidden, const at::Tensor& pool_mask) {
  const int64_t N = pooled.size(0), B = pool_mask.size(0), T = hidden.size(-2), D = hidden.size(-1);
  const at::Tensor h = hidden.to(pooled.scalar_type()).contiguous();
  const at::Tensor mask = pool_mask.ne(0).to(at::kByte).contiguous();
  std::vector<int64_t> ntok(N);
  AT_DISPATCH_FLOATING_TYPES(pooled.scalar_type(), "class_stats_pool_cpu", [&] {
    masked_mean_pool<scalar_t>(h.data_ptr<scalar_t>(), mask.data_ptr<uint8_t>(), pooled.data_ptr<scalar_t>(),
                               ntok.data(), N, B, T, D);
  });
  return ntok;
}

void class_stats_update_cpu(const at::Tensor& count, const at::Tensor& mean, const at::Tensor& m2,
                            const at::Tensor& hidden, const at::Tensor& pool_mask, const at::Tensor& labels,
                            const std::optional<at::Tensor>& order, const std::optional<at::Tensor>& offsets) {
  // The CPU groups the examples by class on the host from the labels (a loop over B): a given grouping is checked,
  // not needed.
  const int64_t L = check_class_stats_update(count, mean, m2, hidden, pool_mask, labels, order, offsets);
  const bool layers = hidden.dim() == 4;
  const int64_t B = hidden.size(-3), D = hidden.size(-1), C = count.size(-1);
  if (B == 0 || L == 0) return;
  const at::Tensor lab = labels.contiguous();
  const int64_t* lp = lab.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(lp[b] >= 0 && lp[b] < C, "fastsel: label ", lp[b], " of example ", b, " out of range [0, ", C, ")");

  at::Tensor pooled = at::empty({L * B, D}, mean.options());  // the layers' examples one after another
  const std::vector<int64_t> ntok = pool_rows(pooled, hidden, pool_mask);

  // Members of each class in this batch (examples with no pooled token are skipped): the same for every layer.
  std::vector<std::vector<int64_t>> members(C);
  for (int64_t b = 0; b < B; ++b)
    if (ntok[b] > 0) members[lp[b]].push_back(b);

  const at::Tensor count_l = layers ? count : count.unsqueeze(0);  // (L, C), (L, C, D), (L, C, D, D)
  const at::Tensor mean_l = layers ? mean : mean.unsqueeze(0);
  const at::Tensor m2_l = layers ? m2 : m2.unsqueeze(0);
  for (int64_t c = 0; c < C; ++c) {
    const int64_t nb = static_cast<int64_t>(members[c].size());
    if (nb == 0) continue;
    const at::Tensor idx = at::from_blob(members[c].data(), {nb}, at::TensorOptions().dtype(at::kLong)).clone();
    for (int64_t l = 0; l < L; ++l) {
      const at::Tensor x = pooled.narrow(0, l * B, B).index_select(0, idx);  // (nb, D)
      const at::Tensor mb = x.mean(0);                                          // batch mean of the class
      const at::Tensor xc = x - mb;                                             // centred on the batch mean
      double* cp = count_l.data_ptr<double>() + l * C;
      const double na = cp[c], n = na + static_cast<double>(nb);
      at::Tensor mc = mean_l[l][c], sc = m2_l[l][c];
      const at::Tensor delta = mb - mc;
      sc.addmm_(xc.t(), xc);
      if (na > 0) sc.addr_(delta, delta, 1.0, na * static_cast<double>(nb) / n);
      mc.add_(delta, static_cast<double>(nb) / n);
      cp[c] = n;
    }
  }
}

void class_stats_pool_cpu(const at::Tensor& pooled, const at::Tensor& hidden, const at::Tensor& pool_mask) {
  check_class_stats_pool(pooled, hidden, pool_mask);
  if (hidden.size(0) == 0) return;
  pool_rows(pooled, hidden, pool_mask);
}

}  // namespace
}  // namespace fastsel

TORCH_LIBRARY_IMPL(fastsel, CPU, m) {
  m.impl("class_stats_update", &fastsel::class_stats_update_cpu);
  m.impl("class_stats_pool", &fastsel::class_stats_pool_cpu);
}
