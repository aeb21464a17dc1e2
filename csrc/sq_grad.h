// Per-example squared-gradient accumulation (the Fisher diagonal), shared declarations.
//
// Each op adds sum_b (per-example gradient of example b)^2 into an fp32 accumulator `out`, from the
// layer inputs and output gradients captured during ONE batched backward. The per-example gradients of
// the whole layer are never materialised at once.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace fastsel {

// Validate arguments (shared by every backend). Throws c10::Error with a readable message.
// Kernel variants of the linear op (see the schema in sq_grad.cpp).
constexpr int64_t kLinearVariantAuto = 0, kLinearVariantWmma = 1, kLinearVariantPipelined = 2, kLinearVariantMax = 2;

void check_linear_sq_grad(const at::Tensor& out, const at::Tensor& grad_output, const at::Tensor& input,
                          int64_t variant = 0);
void check_norm_sq_grad(const at::Tensor& out, const at::Tensor& grad_output, const std::optional<at::Tensor>& input);
void check_embedding_sq_grad(const at::Tensor& out, const at::Tensor& grad_output, const at::Tensor& indices);
void check_layer_norm_sq_grad(const std::optional<at::Tensor>& weight_out, const std::optional<at::Tensor>& bias_out,
                              const at::Tensor& grad_output, const at::Tensor& input, double eps);

// (B, *, F) -> (B, T, F) view/copy with the middle dims flattened; 2-d (B, F) becomes (B, 1, F).
at::Tensor as_btf(const at::Tensor& t);

}  // namespace fastsel
