// The linear op's second CUDA kernel (variant Pipelined): out[o, i] += sum_b (sum_t g[b,t,o] x[b,t,i])^2
// for bf16/fp16 operands, aimed at the speed of the weight-gradient GEMM of the same shape (the per-example
// products have exactly its FLOPs, plus O*I*B squares).
//
// Against the 64x64 WMMA kernel of sq_grad_kernels.cu:
//  * CTA tile 128 (o) x 128 (i), 8 warps in a 4 x 2 grid, each warp 32 x 64 = 2 x 8 mma.sync m16n8k16
//    tiles (four times the work per staged element per barrier);
//  * fragments loaded with ldmatrix.trans straight from the k-major tiles (WMMA's col-major loads compile
//    to generic LD + MOVM transposes: measured on an H200 at 10-15 % of the bf16 GEMM rate);
//  * a kStages-deep cp.async pipeline (16-byte copies that bypass L1 and land in shared memory while the
//    tensor cores work on earlier stages): the k-tiles of every example of the block's range are ONE
//    stream (example b's t-tiles, then b+1's, ...), so the pipeline never drains between examples;
//  * at each example boundary the fp32 accumulators are squared into a second register-resident
//    fragment set and cleared: no per-example result leaves the registers.
// Zero-fill of tiles past T, O, I comes from cp.async's src-size operand. Conditions (else the launcher
// keeps the 64x64 kernel): O, I multiples of 8 and 16-byte aligned operands, so every 16-byte chunk is
// either wholly inside or wholly outside a row.
//
// Blocks split the examples (grid.y) when the tiles alone would not fill the GPU, with the chunk of
// examples per block chosen so that the last wave is as full as possible; each block then adds its
// partial sum with atomicAdd once at the end (order of fp32 adds varies); with grid.y == 1 the update is
// a plain read-modify-write.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>

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
constexpr int kFragO = kPipeWarpO / 16, kFragN = kPipeWarpI / 8;  // m16n8k16 tiles per warp: 2 x 8
constexpr int kStages = 4;

// Elements of one pipeline stage: the G tile, then the X tile, TK rows of kPipeLd each. (Constexpr
// variables rather than functions: device code may use them without --expt-relaxed-constexpr.)
template <int TK>
constexpr int kStageElems = 2 * TK * kPipeLd;
template <typename T, int TK>
constexpr int kPipeSmemBytes = kStages * kStageElems<TK> * static_cast<int>(sizeof(T));

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

// ---- warp-level matrix instructions: ldmatrix and mma.sync m16n8k16 (sm_80+) -----------------------
// The CPU emulation of the tests (g++, no __CUDACC__) gets the same warp-collective semantics from
// per-warp scratch and __syncwarp: the PTX ISA's fragment layouts, written out once more, so that a
// wrong address or register order in the kernel shows up as a wrong number there too.

// Four 8x8 b16 matrices, transposed: lane 8j + r gives the address of row r of matrix j (16 bytes);
// register j of lane 4r + w receives elements (2w, r) and (2w + 1, r) of matrix j (low half first).
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) {
#if defined(__CUDACC__)
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
#else
  static const uint16_t* rows[32][32];  // [warp][lane]
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  rows[warp][lane] = static_cast<const uint16_t*>(smem_row);
  __syncwarp();
  for (int j = 0; j < 4; ++j) {
    const int w = lane % 4, c = lane / 4;
    const uint32_t lo = rows[warp][8 * j + 2 * w][c], hi = rows[warp][8 * j + 2 * w + 1][c];
    r[j] = lo | (hi << 16);
  }
  __syncwarp();
#endif
}

// d (16x8 fp32) += a (16x16, row) * b (16x8, col); T = __nv_bfloat16 or __half. Fragments (g = lane / 4,
// w = lane % 4): a[0] = A(g, 2w..2w+1), a[1] = A(g+8, ..), a[2] = A(g, 2w+8..), a[3] = A(g+8, 2w+8..);
// b[0] = B(2w..2w+1, g), b[1] = B(2w+8.., g); d[0..1] = D(g, 2w..2w+1), d[2..3] = D(g+8, 2w..2w+1).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDACC__)
#define FASTSEL_MMA_16816(AB)                                                                                    \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." AB "." AB ".f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "   \
               "{%8, %9}, {%0, %1, %2, %3};\n"                                                                    \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                                   \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]))
  if constexpr (std::is_same<T, __nv_bfloat16>::value)
    FASTSEL_MMA_16816("bf16");
  else
    FASTSEL_MMA_16816("f16");
#undef FASTSEL_MMA_16816
#else
  static uint32_t fa[32][32][4], fb[32][32][2];  // [warp][lane][register]
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int k = 0; k < 4; ++k) fa[warp][lane][k] = a[k];
  for (int k = 0; k < 2; ++k) fb[warp][lane][k] = b[k];
  __syncwarp();
  auto half = [](uint32_t v, int e) {
    const uint16_t bits = static_cast<uint16_t>(e ? v >> 16 : v & 0xffff);
    T t;
    memcpy(&t, &bits, 2);
    return to_float(t);
  };
  auto A = [&](int m, int k) {  // element (m, k) of A from the lane that holds it
    const int reg = (m >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
    return half(fa[warp][4 * (m % 8) + (k % 8) / 2][reg], k % 2);
  };
  auto Bm = [&](int k, int n) { return half(fb[warp][4 * n + (k % 8) / 2][k >= 8 ? 1 : 0], k % 2); };
  const int g = lane / 4, w = lane % 4;
  for (int e = 0; e < 4; ++e) {
    const int m = g + (e >= 2 ? 8 : 0), n = 2 * w + (e % 2);
    float s = 0.f;
    for (int k = 0; k < 16; ++k) s += A(m, k) * Bm(k, n);
    d[e] += s;
  }
  __syncwarp();
#endif
}

template <typename T, int TK>
__global__ void __launch_bounds__(kPipeThreads, 1)
    linear_sq_grad_pipelined_kernel(float* __restrict__ out, const T* __restrict__ g, const T* __restrict__ x,
                                    int64_t B, int64_t Tlen, int64_t O, int64_t I, int64_t tiles_i, int64_t b_chunk) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  FASTSEL_DYNAMIC_SMEM(smem_raw, (kPipeSmemBytes<T, TK>));
  T* smem = reinterpret_cast<T*>(smem_raw);

  const int64_t o0 = static_cast<int64_t>(blockIdx.x / tiles_i) * kPipeTile;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x % tiles_i) * kPipeTile;
  const int64_t b_begin = static_cast<int64_t>(blockIdx.y) * b_chunk;
  const int64_t b_end = b_begin + b_chunk < B ? b_begin + b_chunk : B;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = (warp / kPipeWarpsI) * kPipeWarpO, wn = (warp % kPipeWarpsI) * kPipeWarpI;
  // ldmatrix row addresses of this lane (matrix j = lane / 8, row lane % 8), as offsets in a stage:
  // A = G^T is stored k-major (sG[t][o]): matrices (k 0-7, m 0-7), (k 0-7, m 8-15), (k 8-15, m 0-7), (k 8-15,
  // m 8-15) are a[0..3]; B = X is stored k-major (sX[t][i]): (k 0-7, n 0-7), (k 8-15, n 0-7) are b[0..1] of
  // an n-tile and (k 0-7, n 8-15), (k 8-15, n 8-15) those of the next.
  const int jm = lane / 8, jr = lane % 8;
  const int a_off = ((jm / 2) * 8 + jr) * kPipeLd + wm + (jm % 2) * 8;
  const int b_off = TK * kPipeLd + ((jm % 2) * 8 + jr) * kPipeLd + wn + (jm / 2) * 8;

  float acc[kFragO][kFragN][4], sq[kFragO][kFragN][4];
#pragma unroll
  for (int r = 0; r < kFragO; ++r)
#pragma unroll
    for (int c = 0; c < kFragN; ++c)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[r][c][e] = sq[r][c][e] = 0.f;

  const int64_t ktiles = (Tlen + TK - 1) / TK;  // k-tiles per example
  const int64_t n = b_end > b_begin ? (b_end - b_begin) * ktiles : 0;
  // The prefetch cursor walks (example, first row) of the k-tiles in stream order. A group is committed
  // even when empty, so that the wait_group count below always refers to the same k-tile.
  int64_t pf_b = b_begin, pf_t0 = 0;
  auto advance = [&]() {
    pf_t0 += TK;
    if (pf_t0 >= Tlen) {
      pf_t0 = 0;
      ++pf_b;
    }
  };
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < n) {
      load_k_tile<T, TK>(smem + s * kStageElems<TK>, g, x, pf_b, pf_t0, Tlen, o0, O, i0, I);
      advance();
    }
    cp_async_commit();
  }
  int64_t kt = 0;  // k-tile within the current example
  for (int64_t j = 0; j < n; ++j) {
    cp_async_wait<kStages - 2>();  // this thread's copies of k-tile j have landed ...
    __syncthreads();               // ... and everyone's; and every warp is done with k-tile j - 1's stage
    if (j + kStages - 1 < n) {     // refill the stage k-tile j - 1 used
      load_k_tile<T, TK>(smem + ((j + kStages - 1) % kStages) * kStageElems<TK>, g, x, pf_b, pf_t0, Tlen, o0, O, i0,
                         I);
      advance();
    }
    cp_async_commit();

    const T* stage = smem + (j % kStages) * kStageElems<TK>;
#pragma unroll
    for (int kk = 0; kk < TK; kk += 16) {
      uint32_t a[kFragO][4], b[kFragN][2];
#pragma unroll
      for (int r = 0; r < kFragO; ++r) ldmatrix_x4_trans(a[r], stage + a_off + kk * kPipeLd + 16 * r);
#pragma unroll
      for (int c = 0; c < kFragN; c += 2) {
        uint32_t q[4];
        ldmatrix_x4_trans(q, stage + b_off + kk * kPipeLd + 8 * c);
        b[c][0] = q[0];
        b[c][1] = q[1];
        b[c + 1][0] = q[2];
        b[c + 1][1] = q[3];
      }
#pragma unroll
      for (int r = 0; r < kFragO; ++r)
#pragma unroll
        for (int c = 0; c < kFragN; ++c) mma_16816<T>(acc[r][c], a[r], b[c]);
    }
    if (++kt == ktiles) {  // example boundary: square this example's product, start the next
      kt = 0;
#pragma unroll
      for (int r = 0; r < kFragO; ++r)
#pragma unroll
        for (int c = 0; c < kFragN; ++c)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            sq[r][c][e] = fmaf(acc[r][c][e], acc[r][c][e], sq[r][c][e]);
            acc[r][c][e] = 0.f;
          }
    }
  }
  cp_async_wait<0>();

  // The accumulator layout is known: d[0..1] at (row g, columns 2w, 2w+1), d[2..3] eight rows down.
  const bool atomic = gridDim.y > 1;
  const int gr = lane / 4, gc = 2 * (lane % 4);
#pragma unroll
  for (int r = 0; r < kFragO; ++r)
#pragma unroll
    for (int c = 0; c < kFragN; ++c)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t o = o0 + wm + 16 * r + gr + (e >= 2 ? 8 : 0);
        const int64_t i = i0 + wn + 8 * c + gc + (e % 2);
        if (o < O && i < I) {
          float* dst = out + o * I + i;
          if (atomic)
            atomicAdd(dst, sq[r][c][e]);
          else
            *dst += sq[r][c][e];
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
  int64_t tiles_i = 0;
  const int64_t tiles = out_tiles(p, kPipeTile, &tiles_i);
  if (tiles < 0) return cudaErrorInvalidValue;
  // One 256-thread block per SM (registers: two 32x64 fp32 fragment sets per warp). Examples per block:
  // the chunk c minimising the time of the slowest SM, waves(c) * (c k-tile streams + a fixed cost of
  // about two k-tiles' worth for prologue and epilogue), where waves(c) = ceil(tiles * ceil(B / c) / SMs).
  const int64_t ktiles = ceil_div(p.T, TK);
  int64_t chunk = p.B, best = -1;
  const int64_t sms = dev.sms > 0 ? dev.sms : 1;
  for (int64_t c = 1; c <= p.B && c <= 4096; ++c) {
    const int64_t blocks = tiles * ceil_div(p.B, c);
    if (ceil_div(p.B, c) > 65535) continue;
    const int64_t cost = ceil_div(blocks, sms) * (c * ktiles + 2);
    if (best < 0 || cost < best) {
      best = cost;
      chunk = c;
    }
  }
  const int64_t splits = ceil_div(p.B, chunk);
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
