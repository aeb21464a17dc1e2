// CPU kernels of the per-example squared-gradient ops. One pass over the batch; threads split the
// output so no two threads write the same accumulator element and no atomics are needed.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "sq_grad.h"

// The hot elementwise loops are compiled for AVX-512 and AVX2 as well as the baseline, picked at load time (GCC/clang
// function multiversioning): the extension is built without -march, so that it runs on any x86-64.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define FASTSEL_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FASTSEL_MULTIVERSION
#endif

namespace fastsel {
namespace {

// acc[k] += sum_e src[e * stride + k]^2 over count rows of n floats: blocks of k so that the accumulator block stays in
// L1 while every row adds to it (one read and write of acc per block, not per row).
FASTSEL_MULTIVERSION
void add_squares(float* __restrict acc, const float* __restrict src, int64_t n, int64_t count, int64_t stride) {
  constexpr int64_t kBlock = 2048;
  for (int64_t k0 = 0; k0 < n; k0 += kBlock) {
    const int64_t k1 = std::min(n, k0 + kBlock);
    for (int64_t e = 0; e < count; ++e) {
      const float* row = src + e * stride;
      for (int64_t k = k0; k < k1; ++k) acc[k] += row[k] * row[k];
    }
  }
}

// s[d] += g[d] (x: null) or g[d] * x[d], d < n
FASTSEL_MULTIVERSION
void add_row(float* __restrict s, const float* __restrict g, const float* __restrict x, int64_t n) {
  if (x == nullptr) {
    for (int64_t d = 0; d < n; ++d) s[d] += g[d];
  } else {
    for (int64_t d = 0; d < n; ++d) s[d] += g[d] * x[d];
  }
}

// A LayerNorm row d < n, x_hat = (x - mean) * rstd: sw[d] += g[d] * x_hat[d] (sw non-null), sb[d] += g[d] (sb non-null)
FASTSEL_MULTIVERSION
void add_normalised_row(float* __restrict sw, float* __restrict sb, const float* __restrict g, const float* __restrict x,
                        float mean, float rstd, int64_t n) {
  if (sw != nullptr && sb != nullptr) {
    for (int64_t d = 0; d < n; ++d) {
      sw[d] += g[d] * ((x[d] - mean) * rstd);
      sb[d] += g[d];
    }
  } else if (sw != nullptr) {
    for (int64_t d = 0; d < n; ++d) sw[d] += g[d] * ((x[d] - mean) * rstd);
  } else {
    for (int64_t d = 0; d < n; ++d) sb[d] += g[d];
  }
}

// The mean and rstd = 1 / sqrt(var + eps) of a row of n floats (biased variance), two passes; 16 partial sums so that
// the loops vectorise without reassociation flags.
FASTSEL_MULTIVERSION
void row_moments(const float* __restrict x, int64_t n, double eps, float* mean, float* rstd) {
  constexpr int64_t kLanes = 16;
  float part[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes)
    for (int64_t k = 0; k < kLanes; ++k) part[k] += x[d + k];
  float sum = 0.f;
  for (; d < n; ++d) sum += x[d];
  for (int64_t k = 0; k < kLanes; ++k) sum += part[k];
  const float mu = sum / static_cast<float>(n);
  float sq[kLanes] = {};
  for (d = 0; d + kLanes <= n; d += kLanes)
    for (int64_t k = 0; k < kLanes; ++k) sq[k] += (x[d + k] - mu) * (x[d + k] - mu);
  float var = 0.f;
  for (; d < n; ++d) var += (x[d] - mu) * (x[d] - mu);
  for (int64_t k = 0; k < kLanes; ++k) var += sq[k];
  *mean = mu;
  *rstd = static_cast<float>(1.0 / std::sqrt(static_cast<double>(var) / static_cast<double>(n) + eps));
}

at::Tensor as_float_btf(const at::Tensor& t) { return as_btf(t).to(at::kFloat).contiguous(); }

void accumulate_linear_sq_grad_cpu(const at::Tensor& out, const at::Tensor& grad_output, const at::Tensor& input,
                                   int64_t variant) {
  check_linear_sq_grad(out, grad_output, input, variant);  // one CPU kernel: every variant runs it
  const at::Tensor x = as_float_btf(input);  // (B, T, I)
  const int64_t B = x.size(0), T = x.size(1), I = x.size(2), O = grad_output.size(-1);
  if (B == 0 || T == 0 || O == 0 || I == 0) return;
  if (T == 1) {
    // One position per example: (g x^T)^2 = g^2 (x^2)^T, so the sum over b is a single GEMM.
    const at::Tensor g = as_float_btf(grad_output).select(1, 0);
    out.addmm_(g.square().t(), x.select(1, 0).square());
    return;
  }
  const at::Tensor g = as_float_btf(grad_output);
  // Output rows in blocks (one per task), examples in chunks: one at::bmm per (block, chunk) writes the
  // chunk's per-example gradient rows (nb, r, I) into a bounded fp32 workspace, then one fused pass adds
  // their squares into the accumulator rows (no per-example mm / addcmul dispatches).
  // at least two blocks per thread, so that every thread has work
  const int64_t per_thread = (O + 2 * at::get_num_threads() - 1) / (2 * at::get_num_threads());
  const int64_t rows = std::min<int64_t>({O, std::max<int64_t>(16, 65536 / I), std::max<int64_t>(8, per_thread)});
  const int64_t num_blocks = (O + rows - 1) / rows;
  // workspace ~ 1 MiB per task (chunk * rows * I floats; 0.5 to 4 MiB measured alike on BERT's shapes)
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(B, (int64_t(1) << 18) / std::max<int64_t>(1, rows * I)));
  const at::Tensor gt = g.transpose(1, 2);  // (B, O, T), a strided view: BLAS reads it transposed
  at::parallel_for(0, num_blocks, 1, [&](int64_t begin, int64_t end) {
    at::Tensor ws = at::empty({chunk, rows, I}, x.options());
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t o0 = blk * rows, r = std::min(rows, O - o0);
      float* acc = out.data_ptr<float>() + o0 * I;  // rows o0..o0+r of a contiguous (O, I)
      for (int64_t b0 = 0; b0 < B; b0 += chunk) {
        const int64_t nb = std::min(chunk, B - b0);
        at::Tensor w = ws.narrow(0, 0, nb).narrow(1, 0, r);
        at::bmm_out(w, gt.narrow(0, b0, nb).narrow(1, o0, r), x.narrow(0, b0, nb));
        add_squares(acc, w.data_ptr<float>(), r * I, nb, w.stride(0));
      }
    }
  });
}

void accumulate_norm_sq_grad_cpu(const at::Tensor& out, const at::Tensor& grad_output,
                                 const std::optional<at::Tensor>& input) {
  check_norm_sq_grad(out, grad_output, input);
  const at::Tensor g = as_float_btf(grad_output);
  const int64_t B = g.size(0), T = g.size(1), D = g.size(2);
  if (B == 0 || T == 0 || D == 0) return;
  at::Tensor x;
  if (input.has_value()) x = as_float_btf(*input);
  const float* gp = g.data_ptr<float>();
  const float* xp = input.has_value() ? x.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  at::parallel_for(0, D, 512, [&](int64_t begin, int64_t end) {
    std::vector<float> s(end - begin);
    for (int64_t b = 0; b < B; ++b) {
      std::fill(s.begin(), s.end(), 0.f);
      for (int64_t t = 0; t < T; ++t) {
        const int64_t row = (b * T + t) * D + begin;
        add_row(s.data(), gp + row, xp ? xp + row : nullptr, end - begin);
      }
      add_squares(op + begin, s.data(), end - begin, 1, 0);
    }
  });
}

void accumulate_layer_norm_sq_grad_cpu(const std::optional<at::Tensor>& weight_out, const std::optional<at::Tensor>& bias_out,
                                       const at::Tensor& grad_output, const at::Tensor& input, double eps) {
  check_layer_norm_sq_grad(weight_out, bias_out, grad_output, input, eps);
  const at::Tensor g = as_float_btf(grad_output);
  const int64_t B = g.size(0), T = g.size(1), D = g.size(2);
  if (B == 0 || T == 0 || D == 0) return;
  const at::Tensor x = as_float_btf(input);
  const float* gp = g.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  // Each row's mean and rstd (two passes), then the columns.
  std::vector<float> mean(B * T), rstd(B * T);
  at::parallel_for(0, B * T, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) row_moments(xp + r * D, D, eps, &mean[r], &rstd[r]);
  });
  float* wp = weight_out.has_value() ? weight_out->data_ptr<float>() : nullptr;
  float* bp = bias_out.has_value() ? bias_out->data_ptr<float>() : nullptr;
  at::parallel_for(0, D, 512, [&](int64_t begin, int64_t end) {
    const int64_t n = end - begin;
    std::vector<float> sw(wp ? n : 0), sb(bp ? n : 0);
    for (int64_t b = 0; b < B; ++b) {
      std::fill(sw.begin(), sw.end(), 0.f);
      std::fill(sb.begin(), sb.end(), 0.f);
      for (int64_t t = 0; t < T; ++t) {
        const int64_t r = b * T + t;
        add_normalised_row(wp ? sw.data() : nullptr, bp ? sb.data() : nullptr, gp + r * D + begin, xp + r * D + begin,
                           mean[r], rstd[r], n);
      }
      if (wp) add_squares(wp + begin, sw.data(), n, 1, 0);
      if (bp) add_squares(bp + begin, sb.data(), n, 1, 0);
    }
  });
}

void accumulate_embedding_sq_grad_cpu(const at::Tensor& out, const at::Tensor& grad_output, const at::Tensor& indices,
                                      int64_t padding_idx) {
  check_embedding_sq_grad(out, grad_output, indices);
  const at::Tensor g = as_float_btf(grad_output);  // (B, T, D)
  const int64_t B = g.size(0), T = g.size(1), D = g.size(2), V = out.size(0);
  if (B == 0 || T == 0 || D == 0) return;
  const at::Tensor idx = indices.reshape({B, T}).to(at::kLong).contiguous();
  const int64_t* ip = idx.data_ptr<int64_t>();
  // Group the positions of each example by token: a token repeated inside one example contributes the
  // square of the SUM of its rows, not the sum of squares.
  std::vector<int64_t> perm(B * T), group_start, group_token;
  std::iota(perm.begin(), perm.end(), 0);
  for (int64_t b = 0; b < B; ++b) {
    auto first = perm.begin() + b * T;
    std::sort(first, first + T, [&](int64_t a, int64_t c) { return ip[a] < ip[c]; });
    for (int64_t k = 0; k < T; ++k) {
      const int64_t v = ip[first[k]];
      TORCH_CHECK(v >= 0 && v < V, "fastsel: embedding index ", v, " out of range [0, ", V, ")");
      if (k == 0 || ip[first[k - 1]] != v) {
        group_start.push_back(b * T + k);
        group_token.push_back(v);
      }
    }
  }
  group_start.push_back(B * T);
  const int64_t G = static_cast<int64_t>(group_token.size());
  const float* gp = g.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, D, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> s(end - begin);
    for (int64_t k = 0; k < G; ++k) {
      const int64_t v = group_token[k];
      if (v == padding_idx) continue;  // nn.Embedding never updates its padding row
      std::fill(s.begin(), s.end(), 0.f);
      for (int64_t p = group_start[k]; p < group_start[k + 1]; ++p) add_row(s.data(), gp + perm[p] * D + begin, nullptr, end - begin);
      add_squares(op + v * D + begin, s.data(), end - begin, 1, 0);
    }
  });
}

}  // namespace
}  // namespace fastsel

TORCH_LIBRARY_IMPL(fastsel, CPU, m) {
  m.impl("accumulate_linear_sq_grad", &fastsel::accumulate_linear_sq_grad_cpu);
  m.impl("accumulate_norm_sq_grad", &fastsel::accumulate_norm_sq_grad_cpu);
  m.impl("accumulate_embedding_sq_grad", &fastsel::accumulate_embedding_sq_grad_cpu);
  m.impl("accumulate_layer_norm_sq_grad", &fastsel::accumulate_layer_norm_sq_grad_cpu);
}
