// Hopper warpgroup MMA (wgmma, sm_90a only): both operands read from shared memory by the tensor
// cores, fp32 accumulators in registers. The streaming kernel's 64-row configuration uses it
// (sprm_head_stream.cuh): mma.sync there needed an ldmatrix per fragment and kept the tensor pipe
// about a third busy, while one m64n80k16 here multiplies a whole [64 rows x 16
// columns] row tile by an 80-unit W1 box.
//
// Operand layout (both): K-major tiles of 64 bf16/fp16 columns (128 bytes per row), 128-byte
// swizzled as TMA writes them: 16-byte chunk c of row r at chunk c ^ (r % 8), 8-row atoms of 1024
// bytes, the tile 1024-byte aligned. A k16 step inside the tile moves the start address by 32 bytes;
// the swizzle is applied to the full address, so the atoms' alignment keeps the pattern right.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace xbai {

// Units (the N of the instruction) one wgmma of the streaming kernel multiplies: a whole W1 box.
constexpr int kGroupMmaUnits = 80;

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
constexpr bool kGroupMmaCompiled = true;

// Shared-memory matrix descriptor of a 128-byte-swizzled K-major tile starting at `address`:
// start >> 4 in bits 0-13, the stride between 8-row atoms (1024 bytes) >> 4 in bits 32-45, the
// leading offset unused by this layout (1), and the 128-byte swizzle mode (1) in bits 62-63.
__device__ __forceinline__ uint64_t swizzled_tile_descriptor(uint32_t address) {
  return static_cast<uint64_t>((address & 0x3FFFF) >> 4) | (uint64_t{1} << 16) | (uint64_t{1024 >> 4} << 32) |
         (uint64_t{1} << 62);
}

// Orders this warp's earlier register accesses before the next wgmma (required before the first one
// and whenever other instructions touched the accumulators).
__device__ __forceinline__ void group_mma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void group_mma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// Waits until at most `Pending` committed groups of this warpgroup are still running.
template <int Pending>
__device__ __forceinline__ void group_mma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(Pending) : "memory");
}
// Keeps the compiler from moving accesses of the accumulators across an asynchronous wgmma.
template <int N>
__device__ __forceinline__ void pin_accumulators(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

#define XBAI_D4(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3])
#define XBAI_D40                                                                                             \
  XBAI_D4(0), XBAI_D4(4), XBAI_D4(8), XBAI_D4(12), XBAI_D4(16), XBAI_D4(20), XBAI_D4(24), XBAI_D4(28), \
      XBAI_D4(32), XBAI_D4(36)
// The accumulators are added to (scale-d true: %42 is 1); A and B unscaled and not transposed.
#define XBAI_WGMMA_64X80(TYPE)                                                                            \
  "{\n .reg .pred scale_d;\n setp.ne.b32 scale_d, %42, 0;\n"                                                      \
  " wgmma.mma_async.sync.aligned.m64n80k16.f32." TYPE "." TYPE                                            \
  " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21," \
  " %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39}, %40, %41,"  \
  " scale_d, 1, 1, 0, 0;\n}\n"

// D[64 x 80] += A[64 x 16] . B[80 x 16]^T (A: rows by K, B: units by K, both descriptors). Thread t of
// the warpgroup holds rows 16 (t / 32) + (t % 32) / 4 (+ 8) and, for each 8-unit block i, units
// 8 i + 2 (t % 4) (+ 1): d[4 i + 2 h + c] is (row + 8 h, unit + c), mma.sync's C layout per block.
template <typename T>
__device__ __forceinline__ void group_mma_64x80(float (&d)[40], uint64_t a, uint64_t b);

template <>
__device__ __forceinline__ void group_mma_64x80<__nv_bfloat16>(float (&d)[40], uint64_t a, uint64_t b) {
  asm volatile(XBAI_WGMMA_64X80("bf16") : XBAI_D40 : "l"(a), "l"(b), "r"(1));
}
template <>
__device__ __forceinline__ void group_mma_64x80<__half>(float (&d)[40], uint64_t a, uint64_t b) {
  asm volatile(XBAI_WGMMA_64X80("f16") : XBAI_D40 : "l"(a), "l"(b), "r"(1));
}

#undef XBAI_WGMMA_64X80
#undef XBAI_D40
#undef XBAI_D4
#else
constexpr bool kGroupMmaCompiled = false;
#endif

}  // namespace xbai
