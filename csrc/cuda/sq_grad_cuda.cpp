// CUDA registrations of the per-example squared-gradient ops: the ATen side of sq_grad_cuda.cu.
//
// The kernels are torch-free (see sq_grad_params.h); this file does what needs ATen: the shared
// argument checks, device guard, dtype casts, .contiguous(), the per-example sort of embedding indices,
// and raising kernel launch errors. Only CUDA builds compile it (FASTSEL_WITH_CUDA).
//
// Dtypes: bf16/fp16 operands stay half and go to the tensor cores. In the linear op a half operand
// paired with an fp32 one (under autocast a LayerNorm output is fp32 while the linear after it ran, and
// back-propagated, in bf16) is cast to that half type on the device, which is what autocast fed the
// forward's matmul; anything else (and the norm op's mixed pairs) is computed in fp32. Nothing here synchronises with the host: shapes are host-side
// metadata, and index checks happen in the kernels.
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
bool is_half(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }

// The dtype the kernel reads: the operands' own when they agree on fp32/bf16/fp16; with `half_wins`
// (the linear op, whose tensor cores need both operands half) the half type when one is half and the
// other fp32; else fp32 (the memory-bound norm op reads fp32 at no real cost and keeps x_hat exact).
at::ScalarType kernel_dtype(at::ScalarType a, at::ScalarType b, bool half_wins = false) {
  if (a == b && kernel_native(a)) return a;
  if (half_wins && is_half(a) && b == at::kFloat) return a;
  if (half_wins && is_half(b) && a == at::kFloat) return b;
  return at::kFloat;
}

at::Tensor btf_as(const at::Tensor& t, at::ScalarType dtype) { return as_btf(t).to(dtype).contiguous(); }

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void accumulate_linear_sq_grad_cuda(const at::Tensor& out, const at::Tensor& grad_output, const at::Tensor& input,
                                    int64_t variant) {
  check_linear_sq_grad(out, grad_output, input, variant);
  if (out.numel() == 0 || grad_output.numel() == 0 || input.numel() == 0) return;  // nothing to add
  const c10::cuda::CUDAGuard device_guard(out.device());
  const at::ScalarType dtype = kernel_dtype(grad_output.scalar_type(), input.scalar_type(), /*half_wins=*/true);
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
  p.variant = static_cast<LinearVariant>(variant);
  p.device = out.get_device();
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
  p.device = out.get_device();
  C10_CUDA_CHECK(launch_norm_sq_grad(p, current_stream()));
}

void accumulate_layer_norm_sq_grad_cuda(const std::optional<at::Tensor>& weight_out, const std::optional<at::Tensor>& bias_out,
                                        const at::Tensor& grad_output, const at::Tensor& input, double eps) {
  check_layer_norm_sq_grad(weight_out, bias_out, grad_output, input, eps);
  if (grad_output.numel() == 0) return;  // B, T or D is 0
  const c10::cuda::CUDAGuard device_guard(grad_output.device());
  const at::ScalarType dtype = kernel_dtype(grad_output.scalar_type(), input.scalar_type());
  const at::Tensor g = btf_as(grad_output, dtype);  // (B, T, D)
  const at::Tensor x = btf_as(input, dtype);        // (B, T, D)
  const at::Tensor stats = at::empty({2, g.size(0) * g.size(1)}, g.options().dtype(at::kFloat));  // mean, rstd
  LayerNormSqGradParams p{};
  p.weight_out = weight_out.has_value() ? weight_out->data_ptr<float>() : nullptr;
  p.bias_out = bias_out.has_value() ? bias_out->data_ptr<float>() : nullptr;
  p.g = g.data_ptr();
  p.x = x.data_ptr();
  p.mean = stats.data_ptr<float>();
  p.rstd = p.mean + stats.size(1);
  p.B = g.size(0);
  p.T = g.size(1);
  p.D = g.size(2);
  p.eps = static_cast<float>(eps);
  p.dtype = elem_type(dtype);
  p.device = grad_output.get_device();
  C10_CUDA_CHECK(launch_layer_norm_sq_grad(p, current_stream()));
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
  // The range check is the kernel's (sorted rows: first and last entries), so no host sync here.
  TORCH_CHECK(V > 0, "fastsel: embedding index out of range [0, 0): out has no rows");
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
  m.impl("accumulate_layer_norm_sq_grad", &fastsel::cuda::accumulate_layer_norm_sq_grad_cuda);
}
