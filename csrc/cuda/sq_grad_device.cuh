// Device helpers shared by the per-example squared-gradient kernels (sq_grad_kernels.cu and
// linear_pipelined_kernels.cu): element conversions, cached device properties, work splitting, cp.async.
// Torch-free, like the kernels. Torch builds .cu files with __CUDA_NO_HALF_CONVERSIONS__ /
// __CUDA_NO_BFLOAT16_CONVERSIONS__, hence the explicit conversions.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <cstring>

#include "sq_grad_params.h"

namespace fastsel {
namespace cuda {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T zero_value();
template <>
__device__ __forceinline__ __nv_bfloat16 zero_value<__nv_bfloat16>() { return __float2bfloat16(0.f); }
template <>
__device__ __forceinline__ __half zero_value<__half>() { return __float2half(0.f); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct DeviceInfo {
  int sms = 1;
  int major = 0;
  int max_smem_optin = 48 * 1024;  // bytes of shared memory a block may opt in to
};

// Properties of device `dev`, queried once per process and device (no runtime call on the hot path).
inline cudaError_t device_info(int dev, DeviceInfo* info) {
  constexpr int kMaxDevices = 64;
  static DeviceInfo cache[kMaxDevices];
  static std::atomic<bool> ready[kMaxDevices];
  if (dev >= 0 && dev < kMaxDevices && ready[dev].load(std::memory_order_acquire)) {
    *info = cache[dev];
    return cudaSuccess;
  }
  DeviceInfo d;
  cudaError_t err = cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&d.major, cudaDevAttrComputeCapabilityMajor, dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&d.max_smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err != cudaSuccess) return err;
  if (dev >= 0 && dev < kMaxDevices) {  // racing writers store identical values
    cache[dev] = d;
    ready[dev].store(true, std::memory_order_release);
  }
  *info = d;
  return cudaSuccess;
}

// Square tiles of an (O x I) output, numbered row-major for grid.x: sets *tiles_i (tiles along I) and
// returns the number of tiles, or -1 when they do not fit grid.x.
inline int64_t out_tiles(const LinearSqGradParams& p, int64_t tile, int64_t* tiles_i) {
  *tiles_i = ceil_div(p.I, tile);
  const int64_t tiles = ceil_div(p.O, tile) * *tiles_i;
  return tiles > 0x7fffffff ? -1 : tiles;
}

// Number of blocks to split a reduction over `work` items into, so that about `target_blocks` blocks
// run in all; returns the chunk size (items per block) and sets *splits (<= 65535, for grid.y).
inline int64_t split_chunk(int64_t work, int64_t tiles, int64_t target_blocks, int64_t granule, int64_t* splits) {
  int64_t want = ceil_div(target_blocks, tiles);
  if (want < 1) want = 1;
  if (want > 65535) want = 65535;
  int64_t chunk = ceil_div(work, want);
  chunk = ceil_div(chunk, granule) * granule;
  if (chunk < granule) chunk = granule;
  *splits = ceil_div(work, chunk);
  return chunk;
}

// 16-byte global -> shared copy, asynchronous on sm_80+ (cp.async.cg: bypasses L1). `valid == false`
// zero-fills the 16 bytes (src-size 0), so tiles past T, O or I need no separate branch. Elsewhere (the
// CPU emulation of the tests) a plain synchronous copy with the same effect.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n) : "memory");
#else
  if (valid)
    memcpy(smem, gmem, 16);
  else
    memset(smem, 0, 16);
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Wait until at most N of this thread's committed cp.async groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// The 128x128 cp.async pipelined WMMA kernel (linear_pipelined_kernels.cu): whether it can take this
// call (bf16/fp16, T > 1, O and I multiples of 8, 16-byte aligned operands, sm_80+ code), and its launch.
bool linear_pipelined_eligible(const LinearSqGradParams& p, const DeviceInfo& dev);
cudaError_t launch_linear_pipelined(const LinearSqGradParams& p, const DeviceInfo& dev, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastsel
