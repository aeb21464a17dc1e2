// The linear op's second CUDA kernel (variant Pipelined): out[o, i] += sum_b (sum_t g[b,t,o] x[b,t,i])^2
// for bf16/fp16 operands, aimed at the speed of the weight-gradient GEMM of the same shape (the per-example
// products have exactly its FLOPs, plus O*I*B squares).
//
// Against the 64x64 kernel of sq_grad_kernels.cu:
//  * CTA tile 128 (o) x 128 (i), 8 warps in a 4 x 2 grid, each warp 32 x 64 = 2 x 4 WMMA 16x16x16
//    accumulator fragments (twice the reuse of every staged element per barrier);
//  * a kStages-deep cp.async pipeline (16-byte copies that bypass L1 and land in shared memory while the
//    tensor cores work on earlier stages): the k-tiles of every example of the block's range are ONE
//    stream (example b's t-tiles, then b+1's, ...), so the pipeline never drains between examples;
//  * at each example boundary the fp32 accumulators are squared into a second register-resident
//    fragment set and cleared: no per-example result leaves the registers.
// Zero-fill of tiles past T, O, I comes from cp.async's src-size operand. Conditions (else the launcher
// keeps the 64x64 kernel): O, I multiples of 8 and 16-byte aligned operands, so every 16-byte chunk is
// either wholly inside or wholly outside a row.
//
// Blocks split the examples (grid.y) when the tiles alone would not fill the GPU; each then adds its
// partial sum with atomicAdd once at the end (order of fp32 adds varies); with grid.y == 1 the update is
// a plain read-modify-write.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <atomic>
#include <cstdint>

#include "sq_grad_device.cuh"
#include "sq_grad_params.h"

// Shared memory beyond 48 KB must be dynamic; the CPU emulation of the tests (no __CUDACC__) gives each
// "block" a static buffer instead, since its blocks run one after another.
#if defined(__CUDACC__)
#define FASTSEL_DYNAMIC_SMEM(name, bytes) extern __shared__ __align__(128) unsigned char name[]
#else
#define FASTSEL_DYNAMIC_SMEM(name, bytes) alignas(128) static unsigned char name[bytes]
#endif

namespace fastsel {
namespace cuda {
namespace {

constexpr int kPipeTile = 128;             // o and i extent of a CTA tile
constexpr int kPipeLd = kPipeTile + 8;     // +16 bytes per row: spreads WMMA's row reads over the banks
constexpr int kPipeWarpsO = 4, kPipeWarpsI = 2;
constexpr int kPipeThreads = 32 * kPipeWarpsO * kPipeWarpsI;
constexpr int kPipeWarpO = kPipeTile / kPipeWarpsO;  // 32 rows of o per warp
constexpr int kPipeWarpI = kPipeTile / kPipeWarpsI;  // 64 columns of i per warp
constexpr int kFragO = kPipeWarpO / 16, kFragI = kPipeWarpI / 16;
constexpr int kStages = 4;

// Elements of one pipeline stage: the G tile, then the X tile, TK rows of kPipeLd each. (Constexpr
// variables rather than functions: device code may use them without --expt-relaxed-constexpr.)
template <int TK>
constexpr int kStageElems = 2 * TK * kPipeLd;
// The pipeline, or the epilogue's per-warp 16x16 fp32 scratch, whichever is larger (never both at once).
template <typename T, int TK>
constexpr int kPipeSmemBytes = kStages * kStageElems<TK> * static_cast<int>(sizeof(T)) > (kPipeThreads / 32) * 256 * 4
                                   ? kStages * kStageElems<TK> * static_cast<int>(sizeof(T))
                                   : (kPipeThreads / 32) * 256 * 4;

// Issue the copies of k-tile j (example b_begin + j / ktiles, rows t0 .. t0 + TK) of G's o-tile and X's
// i-tile into `stage`: TK rows x 16 chunks of 8 elements each, per operand.
template <typename T, int TK>
__device__ __forceinline__ void load_k_tile(T* stage, const T* __restrict__ g, const T* __restrict__ x, int64_t b,
                                            int64_t t0, int64_t Tlen, int64_t o0, int64_t O, int64_t i0, int64_t I) {
  constexpr int kChunksPerRow = kPipeTile / 8;
  constexpr int kChunks = TK * kChunksPerRow;
  T* sG = stage;
  T* sX = stage + TK * kPipeLd;
#pragma unroll
  for (int ch = threadIdx.x; ch < kChunks; ch += kPipeThreads) {
    const int r = ch / kChunksPerRow;
    const int cc = (ch % kChunksPerRow) * 8;
    const int64_t t = t0 + r;
    const bool row_ok = t < Tlen;
    const int64_t og = o0 + cc, ix = i0 + cc;
    const bool g_ok = row_ok && og < O, x_ok = row_ok && ix < I;
    // An invalid chunk still needs a legal address: the operand's base (nothing is read from it).
    cp_async16(sG + r * kPipeLd + cc, g_ok ? static_cast<const void*>(g + (b * Tlen + t) * O + og) : g, g_ok);
    cp_async16(sX + r * kPipeLd + cc, x_ok ? static_cast<const void*>(x + (b * Tlen + t) * I + ix) : x, x_ok);
  }
}

template <typename T, int TK>
__global__ void __launch_bounds__(kPipeThreads, 1)
    linear_sq_grad_pipelined_kernel(float* __restrict__ out, const T* __restrict__ g, const T* __restrict__ x,
                                    int64_t B, int64_t Tlen, int64_t O, int64_t I, int64_t tiles_i, int64_t b_chunk) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
  static_assert(TK % 16 == 0, "TK must be a multiple of the WMMA k = 16");
  FASTSEL_DYNAMIC_SMEM(smem_raw, (kPipeSmemBytes<T, TK>));
  T* smem = reinterpret_cast<T*>(smem_raw);

  const int64_t o0 = static_cast<int64_t>(blockIdx.x / tiles_i) * kPipeTile;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x % tiles_i) * kPipeTile;
  const int64_t b_begin = static_cast<int64_t>(blockIdx.y) * b_chunk;
  const int64_t b_end = b_begin + b_chunk < B ? b_begin + b_chunk : B;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = (warp / kPipeWarpsI) * kPipeWarpO, wn = (warp % kPipeWarpsI) * kPipeWarpI;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kFragO][kFragI], sq[kFragO][kFragI];
#pragma unroll
  for (int r = 0; r < kFragO; ++r)
#pragma unroll
    for (int c = 0; c < kFragI; ++c) {
      wmma::fill_fragment(acc[r][c], 0.f);
      wmma::fill_fragment(sq[r][c], 0.f);
    }

  const int64_t ktiles = (Tlen + TK - 1) / TK;  // k-tiles per example
  const int64_t n = b_end > b_begin ? (b_end - b_begin) * ktiles : 0;
  // Prologue: the first kStages - 1 k-tiles in flight (a group is committed even when empty, so that
  // the wait_group count below always refers to the same tile).
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < n) load_k_tile<T, TK>(smem + s * kStageElems<TK>, g, x, b_begin + s / ktiles, (s % ktiles) * TK, Tlen,
                                  o0, O, i0, I);
    cp_async_commit();
  }
  for (int64_t j = 0; j < n; ++j) {
    cp_async_wait<kStages - 2>();  // this thread's copies of k-tile j have landed ...
    __syncthreads();               // ... and everyone's; and every warp is done with k-tile j - 1's stage
    const int64_t jn = j + kStages - 1;  // refill the stage k-tile j - 1 used
    if (jn < n)
      load_k_tile<T, TK>(smem + (jn % kStages) * kStageElems<TK>, g, x, b_begin + jn / ktiles,
                         (jn % ktiles) * TK, Tlen, o0, O, i0, I);
    cp_async_commit();

    const T* sG = smem + (j % kStages) * kStageElems<TK>;
    const T* sX = sG + TK * kPipeLd;
#pragma unroll
    for (int kk = 0; kk < TK; kk += 16) {
      // A = G^T (o x t): element (m = o, k = t) sits at sG[k][m], i.e. column-major with ld kPipeLd.
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> a[kFragO];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bf[kFragI];
#pragma unroll
      for (int r = 0; r < kFragO; ++r) wmma::load_matrix_sync(a[r], sG + kk * kPipeLd + wm + 16 * r, kPipeLd);
#pragma unroll
      for (int c = 0; c < kFragI; ++c) wmma::load_matrix_sync(bf[c], sX + kk * kPipeLd + wn + 16 * c, kPipeLd);
#pragma unroll
      for (int r = 0; r < kFragO; ++r)
#pragma unroll
        for (int c = 0; c < kFragI; ++c) wmma::mma_sync(acc[r][c], a[r], bf[c], acc[r][c]);
    }
    if (j % ktiles == ktiles - 1) {  // example boundary: square this example's product, start the next
#pragma unroll
      for (int r = 0; r < kFragO; ++r)
#pragma unroll
        for (int c = 0; c < kFragI; ++c)
#pragma unroll
          for (int e = 0; e < acc[r][c].num_elements; ++e) {
            sq[r][c].x[e] += acc[r][c].x[e] * acc[r][c].x[e];
            acc[r][c].x[e] = 0.f;
          }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the pipeline's shared memory becomes the epilogue's scratch

  // Fragment layout is opaque: go through a per-warp 16x16 scratch to write only in-bounds elements.
  float* scratch = reinterpret_cast<float*>(smem_raw) + warp * 256;
  const bool atomic = gridDim.y > 1;
#pragma unroll
  for (int r = 0; r < kFragO; ++r) {
#pragma unroll
    for (int c = 0; c < kFragI; ++c) {
      wmma::store_matrix_sync(scratch, sq[r][c], 16, wmma::mem_row_major);
      __syncwarp();
      for (int e = lane; e < 256; e += 32) {
        const int64_t o = o0 + wm + 16 * r + e / 16;
        const int64_t i = i0 + wn + 16 * c + e % 16;
        if (o < O && i < I) {
          float* dst = out + o * I + i;
          if (atomic)
            atomicAdd(dst, scratch[e]);
          else
            *dst += scratch[e];
        }
      }
      __syncwarp();
    }
  }
#else
  __trap();  // the launcher only picks this kernel on sm_80+
#endif
}

// Opt the kernel in to its dynamic shared memory once per process and device.
template <typename T, int TK>
cudaError_t opt_in_smem(int device) {
  constexpr int kMaxDevices = 64;
  static std::atomic<bool> done[kMaxDevices];
  if (device >= 0 && device < kMaxDevices && done[device].load(std::memory_order_acquire)) return cudaSuccess;
  const cudaError_t err = cudaFuncSetAttribute(linear_sq_grad_pipelined_kernel<T, TK>,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize, kPipeSmemBytes<T, TK>);
  if (err == cudaSuccess && device >= 0 && device < kMaxDevices) done[device].store(true, std::memory_order_release);
  return err;
}

template <typename T, int TK>
cudaError_t launch_typed(const LinearSqGradParams& p, const DeviceInfo& dev, cudaStream_t stream) {
  const T* g = static_cast<const T*>(p.g);
  const T* x = static_cast<const T*>(p.x);
  const int64_t tiles_i = ceil_div(p.I, kPipeTile);
  const int64_t tiles = ceil_div(p.O, kPipeTile) * tiles_i;
  if (tiles > 0x7fffffff) return cudaErrorInvalidValue;
  // One 256-thread block per SM (registers: two 32x64 fp32 fragment sets per warp); ~2 waves of blocks,
  // split over examples only as far as needed to get there.
  int64_t splits = 1;
  const int64_t chunk = split_chunk(p.B, tiles, 2LL * dev.sms, 1, &splits);
  const cudaError_t err = opt_in_smem<T, TK>(p.device);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(splits));
  constexpr int smem_bytes = kPipeSmemBytes<T, TK>;
  linear_sq_grad_pipelined_kernel<T, TK><<<grid, kPipeThreads, smem_bytes, stream>>>(
      p.out, g, x, p.B, p.T, p.O, p.I, tiles_i, chunk);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_tk(const LinearSqGradParams& p, const DeviceInfo& dev, cudaStream_t stream) {
  // Short sequences: the 16-row k-tile wastes the least zero padding.
  return p.T <= 16 ? launch_typed<T, 16>(p, dev, stream) : launch_typed<T, 32>(p, dev, stream);
}

}  // namespace

bool linear_pipelined_eligible(const LinearSqGradParams& p, const DeviceInfo& dev) {
  if (p.dtype == ElemType::F32 || p.T <= 1 || dev.major < 8) return false;
  if (p.O % 8 != 0 || p.I % 8 != 0) return false;
  if (reinterpret_cast<uintptr_t>(p.g) % 16 != 0 || reinterpret_cast<uintptr_t>(p.x) % 16 != 0) return false;
  return dev.max_smem_optin >= kPipeSmemBytes<__half, 32>;
}

cudaError_t launch_linear_pipelined(const LinearSqGradParams& p, const DeviceInfo& dev, cudaStream_t stream) {
  if (p.B <= 0 || p.T <= 0 || p.O <= 0 || p.I <= 0) return cudaSuccess;
  switch (p.dtype) {
    case ElemType::BF16:
      return launch_tk<__nv_bfloat16>(p, dev, stream);
    case ElemType::F16:
      return launch_tk<__half>(p, dev, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace fastsel
