// Schemas and argument checks of the per-example squared-gradient ops.
#include "sq_grad.h"

#include <torch/library.h>

namespace fastsel {

namespace {
void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "fastsel: ", name, " must be a floating tensor, got ", t.scalar_type());
}
void check_out(const at::Tensor& out, const at::Tensor& ref) {
  TORCH_CHECK(out.scalar_type() == at::kFloat, "fastsel: out (the accumulator) must be float32, got ", out.scalar_type());
  TORCH_CHECK(out.is_contiguous(), "fastsel: out (the accumulator) must be contiguous");
  TORCH_CHECK(out.device() == ref.device(), "fastsel: out is on ", out.device(), " but grad_output is on ", ref.device());
}
}  // namespace

at::Tensor as_btf(const at::Tensor& t) {
  TORCH_CHECK(t.dim() >= 2, "fastsel: expected a tensor of shape (B, ..., F), got ", t.sizes());
  int64_t positions = 1;  // explicit, as reshape cannot infer -1 when B == 0
  for (int64_t d = 1; d + 1 < t.dim(); ++d) positions *= t.size(d);
  return t.reshape({t.size(0), positions, t.size(-1)});
}

void check_linear_sq_grad(const at::Tensor& out, const at::Tensor& grad_output, const at::Tensor& input,
                          int64_t variant) {
  TORCH_CHECK(variant >= 0 && variant <= kLinearVariantMax, "fastsel: linear_sq_grad variant must be in [0, ",
              kLinearVariantMax, "], got ", variant);
  check_float(grad_output, "grad_output");
  check_float(input, "input");
  check_out(out, grad_output);
  TORCH_CHECK(input.device() == grad_output.device(), "fastsel: input and grad_output on different devices");
  TORCH_CHECK(grad_output.dim() >= 2 && input.dim() == grad_output.dim(),
              "fastsel: linear_sq_grad wants grad_output (B, ..., O) and input (B, ..., I) of equal rank, got ",
              grad_output.sizes(), " and ", input.sizes());
  for (int64_t d = 0; d + 1 < input.dim(); ++d)
    TORCH_CHECK(input.size(d) == grad_output.size(d), "fastsel: input ", input.sizes(), " and grad_output ",
                grad_output.sizes(), " disagree in dim ", d);
  TORCH_CHECK(out.dim() == 2 && out.size(0) == grad_output.size(-1) && out.size(1) == input.size(-1),
              "fastsel: out must be (O, I) = (", grad_output.size(-1), ", ", input.size(-1), "), got ", out.sizes());
}

void check_norm_sq_grad(const at::Tensor& out, const at::Tensor& grad_output, const std::optional<at::Tensor>& input) {
  check_float(grad_output, "grad_output");
  check_out(out, grad_output);
  TORCH_CHECK(grad_output.dim() >= 2, "fastsel: norm_sq_grad wants grad_output (B, ..., D), got ", grad_output.sizes());
  if (input.has_value()) {
    check_float(*input, "input");
    TORCH_CHECK(input->sizes() == grad_output.sizes(), "fastsel: input ", input->sizes(), " and grad_output ",
                grad_output.sizes(), " must have the same shape");
    TORCH_CHECK(input->device() == grad_output.device(), "fastsel: input and grad_output on different devices");
  }
  TORCH_CHECK(out.dim() == 1 && out.size(0) == grad_output.size(-1), "fastsel: out must be (D,) = (",
              grad_output.size(-1), ",), got ", out.sizes());
}

void check_embedding_sq_grad(const at::Tensor& out, const at::Tensor& grad_output, const at::Tensor& indices) {
  check_float(grad_output, "grad_output");
  check_out(out, grad_output);
  TORCH_CHECK(indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt,
              "fastsel: indices must be int64 or int32, got ", indices.scalar_type());
  TORCH_CHECK(indices.device() == grad_output.device(), "fastsel: indices and grad_output on different devices");
  TORCH_CHECK(grad_output.dim() == indices.dim() + 1 && indices.dim() >= 1,
              "fastsel: embedding_sq_grad wants indices (B, ...) and grad_output (B, ..., D), got ", indices.sizes(),
              " and ", grad_output.sizes());
  for (int64_t d = 0; d < indices.dim(); ++d)
    TORCH_CHECK(indices.size(d) == grad_output.size(d), "fastsel: indices ", indices.sizes(), " and grad_output ",
                grad_output.sizes(), " disagree in dim ", d);
  TORCH_CHECK(out.dim() == 2 && out.size(1) == grad_output.size(-1), "fastsel: out must be (V, D) with D = ",
              grad_output.size(-1), ", got ", out.sizes());
}

void check_layer_norm_sq_grad(const std::optional<at::Tensor>& weight_out, const std::optional<at::Tensor>& bias_out,
                              const at::Tensor& grad_output, const at::Tensor& input, double eps) {
  TORCH_CHECK(weight_out.has_value() || bias_out.has_value(),
              "fastsel: layer_norm_sq_grad wants weight_out, bias_out or both, got neither");
  check_float(grad_output, "grad_output");
  check_float(input, "input");
  TORCH_CHECK(grad_output.dim() >= 2, "fastsel: layer_norm_sq_grad wants grad_output (B, ..., D), got ",
              grad_output.sizes());
  TORCH_CHECK(input.sizes() == grad_output.sizes(), "fastsel: input ", input.sizes(), " and grad_output ",
              grad_output.sizes(), " must have the same shape");
  TORCH_CHECK(input.device() == grad_output.device(), "fastsel: input and grad_output on different devices");
  TORCH_CHECK(eps >= 0, "fastsel: layer_norm_sq_grad wants eps >= 0, got ", eps);
  for (const std::optional<at::Tensor>* out : {&weight_out, &bias_out}) {
    if (!out->has_value()) continue;
    check_out(**out, grad_output);
    TORCH_CHECK((*out)->dim() == 1 && (*out)->size(0) == grad_output.size(-1), "fastsel: weight_out and bias_out must be (D,) = (",
                grad_output.size(-1), ",), got ", (*out)->sizes());
  }
}

}  // namespace fastsel

TORCH_LIBRARY_FRAGMENT(fastsel, m) {
  // out[o, i] += sum_b (sum_t grad_output[b, t, o] * input[b, t, i])^2
  // variant: which kernel runs (0 = the backend's own choice: on CUDA the pipelined kernel where it applies;
  // 1 = 64x64 WMMA, 2 = 128x128 cp.async-pipelined mma.sync). Every variant computes the same sums; CPU has
  // one kernel and accepts any variant.
  m.def("accumulate_linear_sq_grad(Tensor(a!) out, Tensor grad_output, Tensor input, int variant=0) -> ()");
  // out[d] += sum_b (sum_t grad_output[b, t, d] * input[b, t, d])^2   (input omitted: a bias, input = 1)
  m.def("accumulate_norm_sq_grad(Tensor(a!) out, Tensor grad_output, Tensor? input) -> ()");
  // out[v, d] += sum_b (sum_{t: indices[b, t] = v} grad_output[b, t, d])^2, rows == padding_idx skipped
  m.def("accumulate_embedding_sq_grad(Tensor(a!) out, Tensor grad_output, Tensor indices, int padding_idx) -> ()");
  // A LayerNorm over the last dim, x_hat = (x - mean) * rsqrt(var + eps) per (b, t) row, computed inside (never stored):
  // weight_out[d] += sum_b (sum_t grad_output[b, t, d] * x_hat[b, t, d])^2, bias_out[d] += sum_b (sum_t grad_output)^2,
  // both from one read of grad_output and input (either output may be omitted).
  m.def("accumulate_layer_norm_sq_grad(Tensor(a!)? weight_out, Tensor(b!)? bias_out, Tensor grad_output, Tensor input, "
        "float eps) -> ()");
}
