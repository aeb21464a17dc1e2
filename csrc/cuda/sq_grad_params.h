// Torch-free interface between the CUDA glue (sq_grad_cuda.cpp, ATen) and the kernels (sq_grad_cuda.cu).
//
// Why torch-free: the .cu files must compile with a bare nvcc (CI has no CUDA torch headers), so they
// see only raw pointers, sizes and a stream. The glue does checks, .contiguous(), dtype casts, sorting.
// All tensors are contiguous; sizes are int64 because B*T*F and O*I can exceed 2^31.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace fastsel {
namespace cuda {

// Element type of grad_output / input. Both operands of one call have the same type (the glue casts).
enum class ElemType : int { F32 = 0, BF16 = 1, F16 = 2 };

// Kernel variants of the linear op (same numbers as kLinearVariant* in csrc/sq_grad.h).
enum class LinearVariant : int { Auto = 0, Wmma = 1, Pipelined = 2 };

// out[o, i] += sum_b (sum_t g[b, t, o] * x[b, t, i])^2
struct LinearSqGradParams {
  float* out;       // (O, I) fp32, contiguous
  const void* g;    // (B, T, O), contiguous, `dtype`
  const void* x;    // (B, T, I), contiguous, `dtype`
  int64_t B, T, O, I;
  ElemType dtype;
  LinearVariant variant = LinearVariant::Auto;
  int device = 0;   // CUDA device index the pointers live on (device properties are cached per index)
};

// out[d] += sum_b (sum_t g[b, t, d] * x[b, t, d])^2; x == nullptr means x = 1 (a bias).
struct NormSqGradParams {
  float* out;       // (D,) fp32
  const void* g;    // (B, T, D)
  const void* x;    // (B, T, D) or nullptr
  int64_t B, T, D;
  ElemType dtype;
  int device = 0;
};

// A LayerNorm over the last dim: x_hat = (x - mean) * rsqrt(var + eps) per (b, t) row (biased var, as the forward):
// weight_out[d] += sum_b (sum_t g * x_hat)^2, bias_out[d] += sum_b (sum_t g)^2. The row statistics go to the
// caller's buffers mean, rstd (B * T floats each) in a first launch; x_hat is never stored.
struct LayerNormSqGradParams {
  float* weight_out;  // (D,) fp32 or nullptr
  float* bias_out;    // (D,) fp32 or nullptr
  const void* g;      // (B, T, D)
  const void* x;      // (B, T, D)
  float* mean;        // (B * T,) fp32 workspace
  float* rstd;        // (B * T,) fp32 workspace
  int64_t B, T, D;
  float eps;
  ElemType dtype;
  int device = 0;
};

// out[v, d] += sum_b (sum_{t: idx[b, t] = v} g[b, t, d])^2, v == padding_idx skipped.
// The glue sorts each example's indices: sorted_idx[b, :] ascending, perm[b, k] = the position t of
// sorted_idx[b, k], so each (example, token) group is a contiguous run. Indices are range-checked on the
// device (an index outside [0, V) stops the kernel with a device-side trap, as torch's own embedding
// kernels do): no host synchronisation.
struct EmbeddingSqGradParams {
  float* out;                // (V, D) fp32
  const void* g;             // (B, T, D)
  const int64_t* sorted_idx; // (B, T), each row ascending, values in [0, V)
  const int64_t* perm;       // (B, T), positions in [0, T)
  int64_t B, T, D, V;
  int64_t padding_idx;       // rows equal to it are skipped (-1: none)
  ElemType dtype;
};

// Each launcher enqueues on `stream`, launches nothing for empty problems, and returns
// cudaGetLastError() (or the first error of a runtime query) for the glue to raise.
cudaError_t launch_linear_sq_grad(const LinearSqGradParams& p, cudaStream_t stream);
cudaError_t launch_norm_sq_grad(const NormSqGradParams& p, cudaStream_t stream);
cudaError_t launch_layer_norm_sq_grad(const LayerNormSqGradParams& p, cudaStream_t stream);
cudaError_t launch_embedding_sq_grad(const EmbeddingSqGradParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastsel
