// CUDA registrations of the per-example squared-gradient ops: the ATen side of sq_grad_cuda.cu.
//
// The kernels are torch-free (see sq_grad_params.h); this file does what needs ATen: the shared
// argument checks, device guard, dtype casts (bf16/fp16 kept when both operands share it, anything
// else computed in fp32, as the CPU kernels do), .contiguous(), the per-example sort of embedding
// indices, and raising kernel launch errors. Only CUDA builds compile it (FASTSEL_WITH_CUDA).
#include <ATen/ATen.h>
// c10/cuda/CUDAStream.h rather than ATen/cuda/CUDAContext.h: same current stream
// (at::cuda::getCurrentCUDAStream forwards to it) without pulling in the cuBLAS/cuSPARSE headers.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "sq_grad.h"
#include "sq_grad_params.h"

namespace fastsel {
namespace cuda {
namespace {

ElemType elem_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return ElemType::F32;
    case at::kBFloat16:
      return ElemType::BF16;
    case at::kHalf:
      return ElemType::F16;
    default:
      break;
  }
  TORCH_CHECK(false, "fastsel: no CUDA kernel for dtype ", t);
  return ElemType::F32;
}

bool kernel_native(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

// The dtype the kernel reads: the operands' own when they agree on fp32/bf16/fp16, else fp32.
at::ScalarType kernel_dtype(at::ScalarType a, at::ScalarType b) {
  return (a == b && kernel_native(a)) ? a : at::kFloat;
}

at::Tensor btf_as(const at::Tensor& t, at::ScalarType dtype) { return as_btf(t).to(dtype).contiguous(); }

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void accumulate_linear_sq_grad_cuda(const at::Tensor& out, const at::Tensor& grad_output, const at::Tensor& input) {
  check_linear_sq_grad(out, grad_output, input);
  if (out.numel() == 0 || grad_output.numel() == 0 || input.numel() == 0) return;  // nothing to add
  const c10::cuda::CUDAGuard device_guard(out.device());
  const at::ScalarType dtype = kernel_dtype(grad_output.scalar_type(), input.scalar_type());
  const at::Tensor g = btf_as(grad_output, dtype);  // (B, T, O)
  const at::Tensor x = btf_as(input, dtype);        // (B, T, I)
  LinearSqGradParams p{};
  p.out = out.data_ptr<float>();
  p.g = g.data_ptr();
  p.x = x.data_ptr();
  p.B = x.size(0);
  p.T = x.size(1);
  p.O = g.size(2);
  p.I = x.size(2);
  p.dtype = elem_type(dtype);
  C10_CUDA_CHECK(launch_linear_sq_grad(p, current_stream()));
}

void accumulate_norm_sq_grad_cuda(const at::Tensor& out, const at::Tensor& grad_output,
                                  const std::optional<at::Tensor>& input) {
  check_norm_sq_grad(out, grad_output, input);
  if (out.numel() == 0 || grad_output.numel() == 0) return;
  const c10::cuda::CUDAGuard device_guard(out.device());
  const at::ScalarType go = grad_output.scalar_type();
  const at::ScalarType dtype = kernel_dtype(go, input.has_value() ? input->scalar_type() : go);
  const at::Tensor g = btf_as(grad_output, dtype);  // (B, T, D)
  at::Tensor x;
  if (input.has_value()) x = btf_as(*input, dtype);
  NormSqGradParams p{};
  p.out = out.data_ptr<float>();
  p.g = g.data_ptr();
  p.x = input.has_value() ? x.data_ptr() : nullptr;
  p.B = g.size(0);
  p.T = g.size(1);
  p.D = g.size(2);
  p.dtype = elem_type(dtype);
  C10_CUDA_CHECK(launch_norm_sq_grad(p, current_stream()));
}

void accumulate_embedding_sq_grad_cuda(const at::Tensor& out, const at::Tensor& grad_output, const at::Tensor& indices,
                                       int64_t padding_idx) {
  check_embedding_sq_grad(out, grad_output, indices);
  if (grad_output.numel() == 0) return;  // B, T or D is 0
  const c10::cuda::CUDAGuard device_guard(out.device());
  const at::ScalarType dtype = kernel_dtype(grad_output.scalar_type(), grad_output.scalar_type());
  const at::Tensor g = btf_as(grad_output, dtype);  // (B, T, D)
  const int64_t B = g.size(0), T = g.size(1), D = g.size(2), V = out.size(0);
  // Sorting each example's tokens makes every (example, token) group a contiguous run for the kernel.
  const at::Tensor idx = indices.reshape({B, T}).to(at::kLong);
  at::Tensor sorted, perm;
  std::tie(sorted, perm) = at::sort(idx, /*dim=*/1);
  sorted = sorted.contiguous();
  perm = perm.contiguous();
  // Range check (one host sync): the smallest and largest index are the first and last sorted columns.
  const at::Tensor bounds = at::stack({sorted.select(1, 0).min(), sorted.select(1, T - 1).max()}).cpu();
  const int64_t lo = bounds[0].item<int64_t>(), hi = bounds[1].item<int64_t>();
  TORCH_CHECK(lo >= 0, "fastsel: embedding index ", lo, " out of range [0, ", V, ")");
  TORCH_CHECK(hi < V, "fastsel: embedding index ", hi, " out of range [0, ", V, ")");
  EmbeddingSqGradParams p{};
  p.out = out.data_ptr<float>();
  p.g = g.data_ptr();
  p.sorted_idx = sorted.data_ptr<int64_t>();
  p.perm = perm.data_ptr<int64_t>();
  p.B = B;
  p.T = T;
  p.D = D;
  p.V = V;
  p.padding_idx = padding_idx;
  p.dtype = elem_type(dtype);
  C10_CUDA_CHECK(launch_embedding_sq_grad(p, current_stream()));
}

}  // namespace
}  // namespace cuda
}  // namespace fastsel

TORCH_LIBRARY_IMPL(fastsel, CUDA, m) {
  m.impl("accumulate_linear_sq_grad", &fastsel::cuda::accumulate_linear_sq_grad_cuda);
  m.impl("accumulate_norm_sq_grad", &fastsel::cuda::accumulate_norm_sq_grad_cuda);
  m.impl("accumulate_embedding_sq_grad", &fastsel::cuda::accumulate_embedding_sq_grad_cuda);
}
