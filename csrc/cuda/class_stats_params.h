// Torch-free interface between the CUDA glue (class_stats_cuda.cpp, ATen) and the kernels
// (class_stats_kernels.cu) of class_stats_update. The glue validates shapes, makes everything
// contiguous, converts pool_mask to 0/1 float, groups the examples by class (a stable sort of the labels
// and the class offsets, on the device) and allocates the workspaces. Labels are range-checked by the
// kernels (a label outside [0, C) traps): nothing synchronises with the host.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace fastsel {
namespace cuda {

// Element type of `hidden`.
enum class ClassStatsInput : int { F32 = 0, BF16 = 1, F16 = 2, F64 = 3 };
// Element type of mean / m2 / the workspaces `pooled` and `batch_mean` (count is always double).
enum class ClassStatsAcc : int { F32 = 0, F64 = 1 };

// L layers of one batch (L = 1: one layer); every per-layer array is the layers' arrays one after another.
struct ClassStatsParams {
  double* count;             // (L, C) running counts
  void* mean;                // (L, C, D) running class means, `acc`
  void* m2;                  // (L, C, D, D) running scatters, `acc`
  const void* hidden;        // (L, B, T, D), `input`
  const float* mask;         // (B, T), 1 = pooled token, 0 = not
  const int64_t* labels;     // (B,), values in [0, C) (checked on the device); null: pool only (class_stats_pool)
  const int64_t* order;      // (B,) example indices sorted by label (stable): class c's members are
  const int64_t* offsets;    // order[offsets[c] .. offsets[c + 1]), offsets (C + 1,)
  void* pooled;              // (L, B, D), `acc`: a workspace, or class_stats_pool's output
  float* ntok;               // workspace (B,): pooled tokens per example (null for class_stats_pool)
  double* batch_count;       // workspace (C,)
  void* batch_mean;          // workspace (L, C, D), `acc`
  int64_t L, B, T, D, C;
  ClassStatsInput input;
  ClassStatsAcc acc;
};

// Enqueues the whole update on `stream` (nothing for B == 0) and returns cudaGetLastError().
cudaError_t launch_class_stats_update(const ClassStatsParams& p, cudaStream_t stream);
// Enqueues the pooling alone (L = 1, labels and ntok null; hidden, mask, pooled, B, T, D, input, acc are read).
cudaError_t launch_class_stats_pool(const ClassStatsParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastsel
