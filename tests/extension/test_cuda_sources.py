"""The CUDA kernel sources (csrc/**/*.cu) compile with a bare nvcc for sm_80 and sm_90, and the
kernels of csrc/cuda/sq_grad_kernels.cu and linear_pipelined_kernels.cu give the right numbers when
emulated on the CPU.

The .cu files are torch-free by design, so this runs without a GPU or a CUDA build of torch; it is
skipped when nvcc is not on PATH. The second compile variant adds the flags torch's CUDAExtension
passes (no implicit half/bf16 conversions), which the kernels must also survive.

The emulation compiles the kernel file as host C++ (g++): one std::thread per CUDA thread, a
std::barrier per block / warp for __syncthreads / __syncwarp, blocks run one after another, WMMA
fragments held whole by every lane (so only the fragment *layout* is not exercised), and cp.async
copies done synchronously (so the pipeline's stage reuse is exercised, its asynchrony is not: the
wait_group/barrier protocol is checked by compute-sanitizer racecheck on a GPU, bench/gpu_check.sh). It checks index
math, edges, zero-fill, splits and atomics against a float64 reference; it is no substitute for a GPU.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CU_FILES = sorted((REPO / "csrc").rglob("*.cu"))
ARCHS = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]
TORCH_NVCC_FLAGS = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
    "-DFASTSEL_WITH_CUDA",
]
VARIANTS = {"ci-c++17": ["-std=c++17"], "torch-c++20": ["-O3", "-std=c++20", *TORCH_NVCC_FLAGS]}

nvcc = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(nvcc is None, reason="nvcc not on PATH")


def test_there_are_cuda_sources():
    assert CU_FILES, "expected csrc/cuda/*.cu"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("cu", CU_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_cu_compiles(cu: Path, variant: str, tmp_path: Path):
    cmd = [nvcc, *VARIANTS[variant], "-c", str(cu), f"-I{REPO / 'csrc'}", *ARCHS, "-o", str(tmp_path / "k.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    assert "error" not in proc.stderr.lower(), proc.stderr


# ------------------------------------------------------------------------------------------------
# CPU emulation of the kernels
# ------------------------------------------------------------------------------------------------

EMU_H = r"""#include <cstdio>
#pragma once
#include <cuda_runtime_api.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>
#undef __global__
#undef __forceinline__
#undef __shared__
#undef __device__
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
inline void __trap() { std::abort(); }
struct EmuDim { unsigned x = 1, y = 1, z = 1; };
inline thread_local EmuDim threadIdx, blockIdx;
inline EmuDim gridDim, blockDim;
inline std::barrier<>* g_bar = nullptr;
inline std::vector<std::unique_ptr<std::barrier<>>> g_warp_bars;
inline void __syncthreads() { g_bar->arrive_and_wait(); }
inline void __syncwarp() {
  unsigned lin = threadIdx.x + threadIdx.y * blockDim.x;
  g_warp_bars[lin / 32]->arrive_and_wait();
}
inline std::mutex g_atomic_mu;
inline float atomicAdd(float* p, float v) { std::lock_guard<std::mutex> l(g_atomic_mu); float o = *p; *p = o + v; return o; }
inline uint4 __ldg(const uint4* p) { return *p; }
inline int g_sms = 2;
inline int g_launches = 0;
inline void emu_launch(dim3 grid, dim3 block, std::function<void()> body) {
  ++g_launches; if (getenv("EMU_V")) fprintf(stderr, "grid %u x %u block %u x %u\n", grid.x, grid.y, block.x, block.y);
  gridDim = {grid.x, grid.y, grid.z};
  blockDim = {block.x, block.y, block.z};
  unsigned n = block.x * block.y;
  for (unsigned bz = 0; bz < grid.z; ++bz)
  for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      std::barrier<> bar(n);
      g_bar = &bar;
      g_warp_bars.clear();
      for (unsigned w = 0; w < (n + 31) / 32; ++w) g_warp_bars.emplace_back(new std::barrier<>(std::min(32u, n - 32 * w)));
      std::vector<std::thread> ts;
      for (unsigned ty = 0; ty < block.y; ++ty)
        for (unsigned tx = 0; tx < block.x; ++tx)
          ts.emplace_back([=] { threadIdx = {tx, ty, 0}; blockIdx = {bx, by, bz}; body(); });
      for (auto& t : ts) t.join();
    }
}
extern "C" cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
extern "C" cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  *v = a == cudaDevAttrMultiProcessorCount ? g_sms : a == cudaDevAttrMaxSharedMemoryPerBlockOptin ? 227 * 1024 : 9;
  return cudaSuccess; }
template <class F> cudaError_t cudaFuncSetAttribute(F*, cudaFuncAttribute, int) { return cudaSuccess; }
extern "C" cudaError_t cudaGetLastError() { return cudaSuccess; }
template <class F> cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* a, F*) { a->ptxVersion = 80; return cudaSuccess; }

namespace nvcuda { namespace wmma {
struct matrix_a {}; struct matrix_b {}; struct accumulator {}; struct row_major {}; struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
template <class Use, int M, int N, int K, class T, class L = void> struct fragment {
  static constexpr int num_elements = 256; float x[256]; };
inline float f(float v) { return v; }
inline float f(__nv_bfloat16 v) { return __bfloat162float(v); }
inline float f(__half v) { return __half2float(v); }
template <class U, class T, class L> void fill_fragment(fragment<U, 16, 16, 16, T, L>& fr, float v) { for (auto& e : fr.x) e = v; }
template <class U, class T, class L> void load_matrix_sync(fragment<U, 16, 16, 16, T, L>& fr, const T* p, unsigned ld) {
  for (int r = 0; r < 16; ++r) for (int c = 0; c < 16; ++c)
    fr.x[r * 16 + c] = std::is_same_v<L, col_major> ? f(p[r + c * ld]) : f(p[r * ld + c]); }
template <class T> void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, col_major>& a,
              const fragment<matrix_b, 16, 16, 16, T, row_major>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  float out[256];
  for (int m = 0; m < 16; ++m) for (int n = 0; n < 16; ++n) { float s = c.x[m * 16 + n]; for (int k = 0; k < 16; ++k) s += a.x[m * 16 + k] * b.x[k * 16 + n]; out[m * 16 + n] = s; }
  for (int i = 0; i < 256; ++i) d.x[i] = out[i]; }
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& fr, unsigned ld, layout_t) {
  for (int r = 0; r < 16; ++r) for (int c = 0; c < 16; ++c) p[r * ld + c] = fr.x[r * 16 + c]; }
}}
"""

EMU_MAIN = r"""#include "kernels_emu.cpp"
#include <algorithm>
#include <cstdio>
#include <numeric>
#include <random>
using namespace fastsel::cuda;
static std::mt19937 rng(123);
static float rnd() { return std::uniform_real_distribution<float>(-1.f, 1.f)(rng); }
template <class T> T cvt(float v);
template <> float cvt<float>(float v) { return v; }
template <> __nv_bfloat16 cvt<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> __half cvt<__half>(float v) { return __float2half(v); }
template <class T> float back(T v) { return nvcuda::wmma::f(v); }
static int fails = 0;
static void compare(const char* what, const std::vector<float>& got, const std::vector<double>& ref) {
  double worst = 0, scale = 1;
  for (size_t i = 0; i < got.size(); ++i) scale = std::max(scale, std::abs(ref[i]));
  for (size_t i = 0; i < got.size(); ++i) worst = std::max(worst, std::abs(got[i] - ref[i]) / scale);
  bool ok = worst < 1e-5;
  if (!ok) ++fails;
  printf("%-60s %s worst rel err %.2e\n", what, ok ? "ok  " : "FAIL", worst);
}
template <class T> void linear_case(ElemType dt, int64_t B, int64_t Tn, int64_t O, int64_t I, int sms,
                                    LinearVariant variant = LinearVariant::Auto) {
  g_sms = sms;
  std::vector<T> g(B * Tn * O), x(B * Tn * I);
  for (auto& v : g) v = cvt<T>(rnd());
  for (auto& v : x) v = cvt<T>(rnd());
  std::vector<float> out(O * I);
  std::vector<double> ref(O * I);
  for (auto& v : out) v = rnd();
  for (size_t i = 0; i < out.size(); ++i) ref[i] = out[i];
  for (int64_t b = 0; b < B; ++b)
    for (int64_t o = 0; o < O; ++o)
      for (int64_t i = 0; i < I; ++i) {
        double s = 0;
        for (int64_t t = 0; t < Tn; ++t) s += (double)back(g[(b * Tn + t) * O + o]) * back(x[(b * Tn + t) * I + i]);
        ref[o * I + i] += s * s;
      }
  // Device properties are cached per device index: one emulated "device" per SM count.
  LinearSqGradParams p{out.data(), g.data(), x.data(), B, Tn, O, I, dt, variant, /*device=*/sms};
  if (launch_linear_sq_grad(p, nullptr) != cudaSuccess) ++fails;
  char buf[128];
  snprintf(buf, sizeof buf, "linear dt=%d B=%ld T=%ld O=%ld I=%ld sms=%d variant=%d", (int)dt, B, Tn, O, I, sms, (int)variant);
  compare(buf, out, ref);
}
template <class T> void norm_case(ElemType dt, int64_t B, int64_t Tn, int64_t D, bool has_x, int sms) {
  g_sms = sms;
  std::vector<T> g(B * Tn * D), x(B * Tn * D);
  for (auto& v : g) v = cvt<T>(rnd());
  for (auto& v : x) v = cvt<T>(rnd());
  std::vector<float> out(D);
  std::vector<double> ref(D);
  for (int64_t d = 0; d < D; ++d) ref[d] = out[d] = rnd();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t d = 0; d < D; ++d) {
      double s = 0;
      for (int64_t t = 0; t < Tn; ++t) { int64_t k = (b * Tn + t) * D + d; s += (double)back(g[k]) * (has_x ? back(x[k]) : 1.0); }
      ref[d] += s * s;
    }
  NormSqGradParams p{out.data(), g.data(), has_x ? x.data() : nullptr, B, Tn, D, dt, /*device=*/sms};
  if (launch_norm_sq_grad(p, nullptr) != cudaSuccess) ++fails;
  char buf[128];
  snprintf(buf, sizeof buf, "norm dt=%d B=%ld T=%ld D=%ld x=%d sms=%d", (int)dt, B, Tn, D, (int)has_x, sms);
  compare(buf, out, ref);
}
template <class T> void emb_case(ElemType dt, int64_t B, int64_t Tn, int64_t D, int64_t V, int64_t pad) {
  std::vector<T> g(B * Tn * D);
  for (auto& v : g) v = cvt<T>(rnd());
  std::vector<int64_t> idx(B * Tn);
  for (auto& v : idx) v = std::uniform_int_distribution<int64_t>(0, V - 1)(rng);
  std::vector<float> out(V * D);
  std::vector<double> ref(V * D);
  for (size_t i = 0; i < out.size(); ++i) ref[i] = out[i] = rnd();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t v = 0; v < V; ++v) {
      if (v == pad) continue;
      for (int64_t d = 0; d < D; ++d) {
        double s = 0; bool any = false;
        for (int64_t t = 0; t < Tn; ++t) if (idx[b * Tn + t] == v) { s += back(g[(b * Tn + t) * D + d]); any = true; }
        if (any) ref[v * D + d] += s * s;
      }
    }
  std::vector<int64_t> sorted(B * Tn), perm(B * Tn);
  for (int64_t b = 0; b < B; ++b) {
    std::iota(perm.begin() + b * Tn, perm.begin() + (b + 1) * Tn, 0);
    std::sort(perm.begin() + b * Tn, perm.begin() + (b + 1) * Tn, [&](int64_t a, int64_t c) { return idx[b * Tn + a] < idx[b * Tn + c]; });
    for (int64_t k = 0; k < Tn; ++k) sorted[b * Tn + k] = idx[b * Tn + perm[b * Tn + k]];
  }
  EmbeddingSqGradParams p{out.data(), g.data(), sorted.data(), perm.data(), B, Tn, D, V, pad, dt};
  if (launch_embedding_sq_grad(p, nullptr) != cudaSuccess) ++fails;
  char buf[128];
  snprintf(buf, sizeof buf, "embedding dt=%d B=%ld T=%ld D=%ld V=%ld pad=%ld", (int)dt, B, Tn, D, V, pad);
  compare(buf, out, ref);
}
int main() {
  // linear fp32 SIMT: edges, T == 1 (square mode, split), splits over b, multiple tiles
  linear_case<float>(ElemType::F32, 3, 5, 20, 37, 1);
  linear_case<float>(ElemType::F32, 5, 1, 20, 37, 1);
  linear_case<float>(ElemType::F32, 40, 1, 9, 70, 4);
  linear_case<float>(ElemType::F32, 2, 17, 70, 130, 1);
  linear_case<float>(ElemType::F32, 9, 3, 66, 5, 8);
  // linear WMMA (TK 16 and 32, vector and scalar staging, edges, splits)
  linear_case<__nv_bfloat16>(ElemType::BF16, 3, 5, 20, 37, 1, LinearVariant::Wmma);
  linear_case<__nv_bfloat16>(ElemType::BF16, 4, 40, 64, 72, 1, LinearVariant::Wmma);
  linear_case<__half>(ElemType::F16, 2, 33, 70, 130, 1, LinearVariant::Wmma);
  linear_case<__half>(ElemType::F16, 7, 16, 16, 24, 8, LinearVariant::Wmma);
  linear_case<__nv_bfloat16>(ElemType::BF16, 6, 1, 30, 40, 2, LinearVariant::Wmma);
  // Auto: pipelined where it applies (aligned), WMMA where not
  linear_case<__nv_bfloat16>(ElemType::BF16, 4, 40, 64, 72, 1);
  linear_case<__half>(ElemType::F16, 2, 33, 70, 130, 1);
  // linear pipelined (128x128 tiles, cp.async stages; TK 16 and 32; edges in o and i; example streams
  // longer than the pipeline; splits over examples with atomics; misaligned shapes fall back to WMMA)
  linear_case<__nv_bfloat16>(ElemType::BF16, 3, 40, 136, 264, 1, LinearVariant::Pipelined);
  linear_case<__half>(ElemType::F16, 5, 16, 64, 128, 8, LinearVariant::Pipelined);
  linear_case<__nv_bfloat16>(ElemType::BF16, 2, 33, 72, 40, 1, LinearVariant::Pipelined);
  linear_case<__half>(ElemType::F16, 7, 5, 8, 16, 4, LinearVariant::Pipelined);
  linear_case<__nv_bfloat16>(ElemType::BF16, 9, 20, 256, 128, 3, LinearVariant::Pipelined);
  linear_case<__nv_bfloat16>(ElemType::BF16, 3, 9, 70, 130, 1, LinearVariant::Pipelined);
  linear_case<__nv_bfloat16>(ElemType::BF16, 4, 1, 24, 40, 1, LinearVariant::Pipelined);
  linear_case<float>(ElemType::F32, 3, 6, 24, 40, 1, LinearVariant::Pipelined);
  // norm
  norm_case<float>(ElemType::F32, 3, 13, 70, true, 1);
  norm_case<float>(ElemType::F32, 5, 1, 33, false, 4);
  norm_case<__nv_bfloat16>(ElemType::BF16, 4, 9, 40, true, 8);
  norm_case<__half>(ElemType::F16, 2, 20, 31, false, 1);
  // embedding: repeats within an example, runs crossing chunks (T > 32), padding
  emb_case<float>(ElemType::F32, 3, 10, 50, 7, -1);
  emb_case<float>(ElemType::F32, 2, 100, 130, 5, 2);
  emb_case<__nv_bfloat16>(ElemType::BF16, 3, 70, 20, 40, 0);
  emb_case<__half>(ElemType::F16, 2, 65, 129, 3, -1);
  // empty problems launch nothing
  int before = g_launches;
  LinearSqGradParams lp{nullptr, nullptr, nullptr, 0, 3, 4, 5, ElemType::F32};
  NormSqGradParams np{nullptr, nullptr, nullptr, 2, 0, 4, ElemType::F32};
  EmbeddingSqGradParams ep{nullptr, nullptr, nullptr, nullptr, 2, 0, 4, 5, -1, ElemType::F32};
  launch_linear_sq_grad(lp, nullptr); launch_norm_sq_grad(np, nullptr); launch_embedding_sq_grad(ep, nullptr);
  printf("empty launches: %d\n", g_launches - before);
  printf("%s (%d failures)\n", fails ? "FAILED" : "ALL OK", fails);
  return fails != 0;
}
"""


EMU_CLASS_STATS_MAIN = r"""#include "kernels_emu.cpp"
#include <algorithm>
#include <cstdio>
#include <numeric>
#include <random>
using namespace fastsel::cuda;
static std::mt19937 rng(7);
static float rnd() { return std::uniform_real_distribution<float>(-1.f, 1.f)(rng); }
static int fails = 0;
static void compare(const char* what, const std::vector<double>& got, const std::vector<double>& ref, double tol) {
  double worst = 0, scale = 1e-30;
  for (double v : ref) scale = std::max(scale, std::abs(v));
  for (size_t i = 0; i < got.size(); ++i) worst = std::max(worst, std::abs(got[i] - ref[i]) / scale);
  const bool ok = worst < tol;
  if (!ok) ++fails;
  printf("%-60s %s worst rel err %.2e\n", what, ok ? "ok  " : "FAIL", worst);
}
// Two batches of L layers merged into running states (count, mean, m2) (L, C, ...), in one launch per batch, against
// a float64 two-pass reference over each layer's pooled states; examples without pooled tokens skipped; classes absent
// from a batch.
void class_stats_case(int64_t L, int64_t B, int64_t T, int64_t D, int64_t C) {
  std::vector<double> count(L * C, 0.0), mean(L * C * D, 0.0), m2(L * C * D * D, 0.0);
  std::vector<std::vector<std::vector<double>>> members(L, std::vector<std::vector<double>>(C));  // per layer, class
  for (int batch = 0; batch < 2; ++batch) {
    std::vector<float> h(L * B * T * D), mask(B * T);
    std::vector<int64_t> labels(B);
    for (auto& v : h) v = rnd();
    for (int64_t b = 0; b < B; ++b) {
      labels[b] = batch == 0 ? (b % (C - 1)) : std::uniform_int_distribution<int64_t>(0, C - 1)(rng);  // class C-1 absent at first
      const int64_t len = (b == 1) ? 0 : 1 + b % T;  // example 1 has no pooled token
      for (int64_t t = 0; t < T; ++t) mask[b * T + t] = t < len ? 1.f : 0.f;
      if (len == 0) continue;
      for (int64_t l = 0; l < L; ++l) {
        std::vector<double> x(D, 0.0);
        for (int64_t t = 0; t < len; ++t) for (int64_t d = 0; d < D; ++d) x[d] += h[((l * B + b) * T + t) * D + d];
        for (auto& v : x) v /= len;
        members[l][labels[b]].insert(members[l][labels[b]].end(), x.begin(), x.end());
      }
    }
    std::vector<int64_t> order(B), offsets(C + 1);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t c) { return labels[a] < labels[c]; });
    for (int64_t c = 0; c <= C; ++c)
      offsets[c] = std::lower_bound(order.begin(), order.end(), c, [&](int64_t e, int64_t v) { return labels[e] < v; }) - order.begin();
    std::vector<double> pooled(L * B * D), batch_count(C), batch_mean(L * C * D);
    std::vector<float> ntok(B);
    ClassStatsParams p{count.data(), mean.data(), m2.data(), h.data(), mask.data(), labels.data(), order.data(),
                       offsets.data(), pooled.data(), ntok.data(), batch_count.data(), batch_mean.data(), L, B, T, D, C,
                       ClassStatsInput::F32, ClassStatsAcc::F64};
    if (launch_class_stats_update(p, nullptr) != cudaSuccess) ++fails;
  }
  std::vector<double> rc(L * C), rm(L * C * D, 0.0), rs(L * C * D * D, 0.0);
  for (int64_t l = 0; l < L; ++l)
    for (int64_t c = 0; c < C; ++c) {
      const std::vector<double>& xs = members[l][c];
      const int64_t n = xs.size() / D, lc = l * C + c;
      rc[lc] = n;
      for (int64_t k = 0; k < n; ++k) for (int64_t d = 0; d < D; ++d) rm[lc * D + d] += xs[k * D + d] / n;
      for (int64_t k = 0; k < n; ++k)
        for (int64_t i = 0; i < D; ++i)
          for (int64_t j = 0; j < D; ++j)
            rs[(lc * D + i) * D + j] += (xs[k * D + i] - rm[lc * D + i]) * (xs[k * D + j] - rm[lc * D + j]);
    }
  char buf[128];
  snprintf(buf, sizeof buf, "class_stats L=%ld B=%ld T=%ld D=%ld C=%ld: count", L, B, T, D, C);
  compare(buf, count, rc, 1e-12);
  snprintf(buf, sizeof buf, "class_stats L=%ld B=%ld T=%ld D=%ld C=%ld: mean", L, B, T, D, C);
  compare(buf, mean, rm, 1e-6);
  snprintf(buf, sizeof buf, "class_stats L=%ld B=%ld T=%ld D=%ld C=%ld: m2", L, B, T, D, C);
  compare(buf, m2, rs, 1e-6);
}
// The pooling alone (class_stats_pool): masked means, zero rows for examples without a pooled token.
void class_stats_pool_case(int64_t B, int64_t T, int64_t D) {
  std::vector<float> h(B * T * D), mask(B * T);
  for (auto& v : h) v = rnd();
  std::vector<double> ref(B * D, 0.0), pooled(B * D, -1.0);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = (b == 0) ? 0 : 1 + b % T;
    for (int64_t t = 0; t < T; ++t) mask[b * T + t] = t < len ? 1.f : 0.f;
    for (int64_t t = 0; t < len; ++t) for (int64_t d = 0; d < D; ++d) ref[b * D + d] += h[(b * T + t) * D + d] / double(len);
  }
  ClassStatsParams p{};
  p.hidden = h.data();
  p.mask = mask.data();
  p.pooled = pooled.data();
  p.L = 1;
  p.B = B;
  p.T = T;
  p.D = D;
  p.C = 1;
  p.input = ClassStatsInput::F32;
  p.acc = ClassStatsAcc::F64;
  if (launch_class_stats_pool(p, nullptr) != cudaSuccess) ++fails;
  char buf[128];
  snprintf(buf, sizeof buf, "class_stats_pool B=%ld T=%ld D=%ld", B, T, D);
  compare(buf, pooled, ref, 1e-6);
}
int main() {
  class_stats_case(1, 7, 5, 20, 3);
  class_stats_case(1, 19, 9, 70, 2);   // more members than the 16-row staging, features past one tile
  class_stats_case(1, 5, 3, 130, 4);   // several pool column blocks
  class_stats_case(3, 7, 5, 20, 3);    // three layers of a batch in one launch
  class_stats_case(4, 19, 4, 70, 2);
  class_stats_pool_case(6, 5, 70);
  printf("%s (%d failures)\n", fails ? "FAILED" : "ALL OK", fails);
  return fails != 0;
}
"""


def _cuda_include_dir() -> Path | None:
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    try:
        dry = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull], capture_output=True, text=True, timeout=60)
        top = re.search(r"TOP=(\S+)", dry.stdout + dry.stderr)
        if top:
            candidates.append(top.group(1))
    except (OSError, subprocess.SubprocessError):
        pass
    candidates.append("/usr/local/cuda")
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_bf16.h").is_file():
            return Path(c) / "include"
    return None


CUDA_HEADERS = ("#include <cuda_bf16.h>", "#include <cuda_fp16.h>", "#include <cuda_runtime.h>", "#include <mma.h>")
# The kernel files of the per-example squared-gradient ops, emulated together as one translation unit.
SQ_GRAD_CU = ["sq_grad_kernels.cu", "linear_pipelined_kernels.cu"]


def _host_translation(cu_sources: list[str], params: str = "sq_grad_params.h") -> str:
    """The kernel files as one host C++ unit: CUDA headers swapped for the emulation, launches made calls."""
    cuda_dir = REPO / "csrc" / "cuda"
    device_h = (cuda_dir / "sq_grad_device.cuh").read_text()
    src = "\n".join(cu_sources)
    src = src.replace('#include "sq_grad_device.cuh"', device_h, 1).replace('#include "sq_grad_device.cuh"', "")
    for inc in CUDA_HEADERS:
        src = src.replace(inc, "")
    src = src.replace("#pragma once", "")
    src = src.replace(f'#include "{params}"', f'#include "emu.h"\n#include "{cuda_dir / params}"', 1)
    src = src.replace(f'#include "{params}"', "")
    # kernel<<<grid, block, shared_bytes, stream>>>(args); -> emu_launch(grid, block, [&]{ kernel(args); });
    launch = re.compile(r"(\w+(?:<[^;<>]*>)?)<<<([^,]+),\s*([^,]+),\s*([^,]+?),\s*stream>>>\((.*?)\);", re.S)
    src, n = launch.subn(lambda m: f"emu_launch({m.group(2)}, {m.group(3)}, [&]{{ {m.group(1)}({m.group(5)}); }});", src)
    assert n > 0, "no kernel launch of the form kernel<<<grid, block, smem, stream>>>(...) found"
    return src


def _emulate(tmp_path: Path, sources: list[str], params: str, main: str) -> str:
    """Compile the kernel files with the emulation header and ``main`` as host C++, run it, return its stdout."""
    include = _cuda_include_dir()
    if include is None:
        pytest.skip("CUDA include directory (cuda_bf16.h) not found")
    (tmp_path / "emu.h").write_text(EMU_H)
    texts = [(REPO / "csrc" / "cuda" / name).read_text() for name in sources]
    (tmp_path / "kernels_emu.cpp").write_text(_host_translation(texts, params=params))
    (tmp_path / "main.cpp").write_text(main)
    exe = tmp_path / "emu"
    cmd = ["g++", "-std=c++20", "-O1", "-pthread", "-w", f"-I{include}", f"-I{tmp_path}", str(tmp_path / "main.cpp"), "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-4000:]}"
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "ALL OK" in run.stdout, run.stdout + run.stderr
    return run.stdout


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not on PATH")
def test_kernels_emulated_on_cpu(tmp_path: Path):
    out = _emulate(tmp_path, SQ_GRAD_CU, "sq_grad_params.h", EMU_MAIN)
    assert "empty launches: 0" in out, out


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not on PATH")
def test_class_stats_kernels_emulated_on_cpu(tmp_path: Path):
    _emulate(tmp_path, ["class_stats_kernels.cu"], "class_stats_params.h", EMU_CLASS_STATS_MAIN)
