// CUDA glue of class_stats_update (compiled only in CUDA builds): checks, layout and dtype preparation,
// the grouping of examples by class, workspaces, and the launch of the torch-free kernels in
// class_stats_kernels.cu on the current stream. No host synchronisation.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "class_stats.h"
#include "cuda/class_stats_params.h"

namespace fastsel {
namespace {

cuda::ClassStatsInput input_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::ClassStatsInput::F32;
    case at::kDouble: return cuda::ClassStatsInput::F64;
    case at::kBFloat16: return cuda::ClassStatsInput::BF16;
    case at::kHalf: return cuda::ClassStatsInput::F16;
    default: TORCH_CHECK(false, "fastsel: class_stats_update: unsupported hidden dtype ", t);
  }
}

void class_stats_update_cuda(const at::Tensor& count, const at::Tensor& mean, const at::Tensor& m2,
                             const at::Tensor& hidden, const at::Tensor& pool_mask, const at::Tensor& labels,
                             const std::optional<at::Tensor>& given_order, const std::optional<at::Tensor>& given_offsets) {
  const int64_t L = check_class_stats_update(count, mean, m2, hidden, pool_mask, labels, given_order, given_offsets);
  TORCH_CHECK(hidden.is_cuda(), "fastsel: class_stats_update CUDA kernel called with a non-CUDA tensor");
  const c10::cuda::CUDAGuard guard(hidden.device());
  const int64_t B = hidden.size(-3), T = hidden.size(-2), D = hidden.size(-1), C = count.size(-1);
  if (B == 0 || L == 0) return;
  const at::Tensor lab = labels.contiguous();
  // The examples grouped by class on the device: class c's members are order[offsets[c] .. offsets[c+1]). Given by
  // the caller once per batch (the same for every layer), else computed here: sort, gather, arange, searchsorted.
  // (Out-of-range labels land outside every class range here; the pool kernel traps on them.)
  at::Tensor order, offsets;
  if (given_order.has_value()) {
    order = given_order->contiguous();
    offsets = given_offsets->contiguous();
  } else {
    order = std::get<1>(at::sort(lab, /*stable=*/true, /*dim=*/0, /*descending=*/false)).contiguous();
    offsets = at::searchsorted(lab.index_select(0, order), at::arange(C + 1, lab.options())).to(at::kLong).contiguous();
  }

  const at::Tensor h = hidden.contiguous();
  const at::Tensor mask = pool_mask.ne(0).to(at::kFloat).contiguous();
  const at::TensorOptions acc_opts = mean.options();
  at::Tensor pooled = at::empty({L, B, D}, acc_opts);
  at::Tensor ntok = at::empty({B}, hidden.options().dtype(at::kFloat));
  at::Tensor batch_count = at::empty({C}, count.options());
  at::Tensor batch_mean = at::empty({L, C, D}, acc_opts);

  cuda::ClassStatsParams p{};
  p.count = count.data_ptr<double>();
  p.mean = mean.data_ptr();
  p.m2 = m2.data_ptr();
  p.hidden = h.data_ptr();
  p.mask = mask.data_ptr<float>();
  p.labels = lab.data_ptr<int64_t>();
  p.order = order.data_ptr<int64_t>();
  p.offsets = offsets.data_ptr<int64_t>();
  p.pooled = pooled.data_ptr();
  p.ntok = ntok.data_ptr<float>();
  p.batch_count = batch_count.data_ptr<double>();
  p.batch_mean = batch_mean.data_ptr();
  p.L = L;
  p.B = B;
  p.T = T;
  p.D = D;
  p.C = C;
  p.input = input_type(h.scalar_type());
  p.acc = mean.scalar_type() == at::kDouble ? cuda::ClassStatsAcc::F64 : cuda::ClassStatsAcc::F32;
  const cudaError_t err = cuda::launch_class_stats_update(p, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "fastsel: class_stats_update CUDA launch failed: ", cudaGetErrorString(err));
}

void class_stats_pool_cuda(const at::Tensor& pooled, const at::Tensor& hidden, const at::Tensor& pool_mask) {
  check_class_stats_pool(pooled, hidden, pool_mask);
  TORCH_CHECK(hidden.is_cuda(), "fastsel: class_stats_pool CUDA kernel called with a non-CUDA tensor");
  const c10::cuda::CUDAGuard guard(hidden.device());
  const int64_t B = hidden.size(0), T = hidden.size(1), D = hidden.size(2);
  if (B == 0) return;
  const at::Tensor h = hidden.contiguous();
  const at::Tensor mask = pool_mask.ne(0).to(at::kFloat).contiguous();
  cuda::ClassStatsParams p{};  // labels and ntok null: the pooling alone
  p.hidden = h.data_ptr();
  p.mask = mask.data_ptr<float>();
  p.pooled = pooled.data_ptr();
  p.L = 1;
  p.B = B;
  p.T = T;
  p.D = D;
  p.C = 1;
  p.input = input_type(h.scalar_type());
  p.acc = pooled.scalar_type() == at::kDouble ? cuda::ClassStatsAcc::F64 : cuda::ClassStatsAcc::F32;
  const cudaError_t err = cuda::launch_class_stats_pool(p, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "fastsel: class_stats_pool CUDA launch failed: ", cudaGetErrorString(err));
}

}  // namespace
}  // namespace fastsel

TORCH_LIBRARY_IMPL(fastsel, CUDA, m) {
  m.impl("class_stats_update", &fastsel::class_stats_update_cuda);
  m.impl("class_stats_pool", &fastsel::class_stats_pool_cuda);
}
