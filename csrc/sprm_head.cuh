// SPRM head kernels: logit = W2 . relu(W1 h + b1) + b2 over a set of rows of `hidden`.
//
// Free of torch and of Python: everything arrives as raw pointers, sizes and a stream, so the
// compiled module never depends on a torch ABI (DESIGN: "our compiled module does not link torch").
//
// Shapes (d = hidden size, H = 2d hidden units of the head):
//   hidden [rows_in, d] with row stride `hidden_stride` (elements), fp16 or bf16
//   w1 [H, d] row-major, b1 [H], w2 [1, H], b2 [1]: the same dtype as hidden
//   out float32 [num_rows]
//
// Three ways to name the rows to score (RowSource):
//   kRowsAll      row i of the output is hidden row i                       (head_logits)
//   kRowsIndexed  row i of the output is hidden row row_index[i]            (packed scorer)
//   kRowsMasked   output i is the head of hidden row i where row_mask[i], else 0.0 (decode scorer)
//
// Work split. The head is a skinny GEMM: W1 [H, d] times the selected rows [n, d]^T. W1 dominates
// the bytes (105 MB at d = 5120 in bf16). The hidden units come in slices of 16 (one mma m16); a
// work item is a run of up to kMaxSlices consecutive slices against one chunk of selected rows.
// The item's slice of W1 streams once through a multi-stage cp.async pipeline of 16-byte copies
// beside the chunk's rows (a few MB at most, L2 resident); tensor cores (mma.sync m16n8k16, fp32
// accumulation) multiply them. Two schedules hand out items:
//   balanced (decode): a persistent grid of one CTA per SM; CTA c owns slices
//     [c S / G, (c + 1) S / G), so every SM streams the same number of W1 bytes to within one slice
//     (at d = 5120 on 132 SMs: 4 or 5 slices). This loop is bound by instruction issue (the
//     address arithmetic of per-thread copies), not by the balance;
//   grouped (packed, many row chunks): 4-slice tiles, kTileGroup tiles times every chunk in a row,
//     so W1 and the rows both stay in L2 while many chunks reuse them.
// On sm_90 the decode scorer and calls of one chunk of <= 64 rows take head_stream_kernel instead
// (sprm_head_stream.cuh): the balanced schedule with W1 streamed by TMA (per-thread cp.async spends
// more issue slots on its addresses than the copies take; docs/kernels.md).
//
// Determinism. Every (unit, row) pre-activation is summed in one fixed order: warp k of the CTA's
// kWarpsK warps takes the 16-column blocks with index = k mod kWarpsK in increasing order, and the
// kWarpsK partial sums are added in warp order. The epilogue (b1, ReLU, W2 in fp32) sums each slice's
// 16 units in unit order into partials[slice, row]; a second small kernel adds the slices in a fixed
// order plus b2. No float atomics: results are bitwise identical run to run, and the same for every
// schedule, tile configuration, grid size and batch (a logit never depends on which other rows or
// units shared its item).
//
// Decode (kRowsMasked) decides on the device which rows are steps: every CTA ranks the mask itself
// (a few hundred bytes), so there is no host synchronization and no compaction launch; with zero
// step rows W1 is never read. On sm_90 the kernels use programmatic dependent launch: each waits on
// `griddepcontrol.wait` before touching any input, so its launch (and an L2 prefetch of the first W1
// stages, harmless since L2 is coherent) overlaps the kernel before it.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace xbai {

enum RowSource : int { kRowsAll = 0, kRowsIndexed = 1, kRowsMasked = 2 };

constexpr int kSliceUnits = 16;
// The K split among warps is fixed for every configuration: it fixes the summation order.
constexpr int kWarpsK = 4;
// Largest item: 80 units. Balanced items at d = 5120 on 132 SMs need 5 slices; larger d (or fewer
// SMs) takes several passes over a CTA's range.
constexpr int kMaxSlices = 5;
constexpr int kMaxUnits = kMaxSlices * kSliceUnits;
// Grouped schedule: 64-unit tiles, kTileGroup of them share every row chunk while in L2.
constexpr int kTileSlices = 4;
constexpr int kTileGroup = 8;

// A tile configuration: ChunkRows selected rows per item, BlockK columns per pipeline stage (a
// multiple of 16 * kWarpsK), Stages stages, WarpsN warps along the rows (times kWarpsK along K),
// plus ProducerWarps warps that only issue copies (the streaming kernel: 1-4; the cp.async one: 0),
// and PrePad floats of padding per unit in the epilogue's pre-activation layout (the streaming
// kernel's, against bank conflicts: sprm_head_stream.cuh).
template <int ChunkRowsV, int BlockKV, int StagesV, int WarpsNV, int ProducerWarpsV = 0, int PrePadV = 0>
struct TileConfig {
  static constexpr int kChunkRows = ChunkRowsV;
  static constexpr int kBlockK = BlockKV;
  static constexpr int kStages = StagesV;
  static constexpr int kWarpsN = WarpsNV;
  static constexpr int kMathWarps = kWarpsK * WarpsNV;
  static constexpr int kWarps = kMathWarps + ProducerWarpsV;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kWarpRows = ChunkRowsV / WarpsNV;
  static constexpr int kNTiles = kWarpRows / 8;
  // 16-column blocks of a stage each warp multiplies.
  static constexpr int kBlocksPerWarp = BlockKV / (16 * kWarpsK);
  // Rows padded by 16 bytes: ldmatrix's eight 16-byte row reads then fall into distinct banks.
  static constexpr int kStride = BlockKV + 8;
  static_assert(kWarpRows % 8 == 0 && BlockKV % (16 * kWarpsK) == 0 && StagesV >= 2, "tile shape");
  template <typename T>
  static constexpr size_t pipeline_bytes() {
    return static_cast<size_t>(kStages) * (kMaxUnits + kChunkRows) * kStride * sizeof(T);
  }
  // Floats between consecutive units' pre-activations in the epilogue's [K-warp][unit][row] layout.
  static constexpr int kPreStride = ChunkRowsV + PrePadV;
  // After the pipeline drains, the same memory holds each K-warp's pre-activations for the item.
  static constexpr size_t reduce_bytes() {
    return static_cast<size_t>(kWarpsK) * kMaxUnits * kPreStride * sizeof(float);
  }
  template <typename T>
  static constexpr size_t smem_bytes() {
    return pipeline_bytes<T>() > reduce_bytes() ? pipeline_bytes<T>() : reduce_bytes();
  }
};

struct HeadParams {
  const void* hidden;
  int64_t hidden_rows;    // rows of `hidden`: the valid range of row_index
  int64_t hidden_stride;  // elements between consecutive rows
  int64_t d;
  int source;             // RowSource
  const int64_t* row_index;  // kRowsIndexed: [num_rows]
  const bool* row_mask;      // kRowsMasked: [num_rows]
  int64_t num_rows;          // outputs
  const void* w1;
  const void* b1;
  const void* w2;
  const void* b2;
  float* partials;       // [num_slices, row_capacity]
  int32_t* output_slot;  // kRowsMasked: [num_rows] rank among step rows, or -1
  int32_t* step_row;     // kRowsMasked: [num_rows] the row of each step rank (the fused tail's map)
  float* out;            // [num_rows]
  int64_t row_capacity;  // num_chunks * chunk rows
  int num_slices;        // H / 16
  int num_chunks;
  int balanced;          // 1: balanced schedule, 0: grouped
  // head_stream_kernel (sprm_head_stream.cuh) only:
  int slices_per_cta;    // CTA c owns slices [c * slices_per_cta, (c + 1) * slices_per_cta)
  int box_slices;        // slices per W1 TMA box; slices_per_cta is a multiple of it
  int fused_tail;        // 1: the last CTA sums the slices (kRowsMasked); 0: head_reduce_kernel does
};

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Programmatic dependent launch (sm_90): wait until the grids this one depends on have finished
// and their writes are visible; let the next grid start launching. No-ops on older GPUs, where the
// launch is an ordinary stream-ordered one.
__device__ __forceinline__ void wait_for_prior_grids() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void allow_next_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
// Asks L2 to fetch `bytes` (a multiple of 16) at a 16-byte aligned address; a hint only.
__device__ __forceinline__ void prefetch_l2(const void* p, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(p), "r"(bytes) : "memory");
#endif
}

// sm_90 transaction barriers (the streaming kernel, sprm_head_stream.cuh). A stage's "full" barrier
// completes when its producers have arrived and every byte announced has landed; its "empty"
// barrier when every math warp has released it.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ void barrier_init(uint64_t* bar, uint32_t arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_address(bar)), "r"(arrivals) : "memory");
}
// Makes the initialized barriers visible to the copy engine (the async proxy).
__device__ __forceinline__ void barrier_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void barrier_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_address(bar)) : "memory");
}
__device__ __forceinline__ void barrier_arrive_expect_bytes(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_address(bar)), "r"(bytes)
               : "memory");
}
// Waits until the barrier's phase with this parity has completed.
__device__ __forceinline__ void barrier_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n .reg .pred complete;\n mbarrier.try_wait.parity.shared::cta.b64 complete, [%1], %2;\n"
        " selp.u32 %0, 1, 0, complete;\n}\n"
        : "=r"(done)
        : "r"(smem_address(bar)), "r"(parity)
        : "memory");
  } while (!done);
}
// An L2 policy for data read once (W1): evicted first, so the step rows and the rest stay in L2.
__device__ __forceinline__ uint64_t evict_first_policy() {
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
  return policy;
}
// Orders this thread's ordinary shared-memory writes before later copy-engine writes to the same bytes.
__device__ __forceinline__ void fence_shared_for_copies() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
#endif

// 16-byte global->shared copy that bypasses L1 (W1 is read once); zero-fills when !valid so tile
// edges and empty row slots cost no memory traffic.
__device__ __forceinline__ void copy_16_async(void* dst, const void* src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_address(dst)), "l"(src),
               "r"(src_bytes));
}
__device__ __forceinline__ void copy_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int Pending>
__device__ __forceinline__ void copy_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending));
}

__device__ __forceinline__ void load_matrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(p)));
}
__device__ __forceinline__ void load_matrix_x2(uint32_t (&r)[2], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_address(p)));
}

template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4],
                                                         const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Ranks the step rows of the mask with the whole CTA; stores in chunk_rows the hidden row of each
// step whose rank lies in [first_rank, first_rank + ChunkRows) and, when `record`, the rank of every
// row in p.output_slot (-1 for non-steps); with p.fused_tail also the row of every rank in
// p.step_row and 0.0 in p.out for every non-step row (the fused tail writes only the steps). Returns
// how many chunk slots were filled and sets *steps to the number of step rows, the same on every
// thread. Ends with a barrier, so chunk_rows is ready to read.
template <class Cfg>
__device__ int rank_masked_rows(const HeadParams& p, int64_t first_rank, bool record, int64_t* chunk_rows,
                                int* warp_counts, int64_t* steps) {
  const bool* row_mask = p.row_mask;
  const int64_t num_rows = p.num_rows;
  constexpr int kChunkRows = Cfg::kChunkRows;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  int64_t rank_base = 0;
  for (int64_t start = 0; start < num_rows; start += Cfg::kThreads) {
    const int64_t row = start + threadIdx.x;
    const bool is_step = row < num_rows && row_mask[row];
    const unsigned ballot = __ballot_sync(0xffffffffu, is_step);
    if (lane == 0) warp_counts[warp] = __popc(ballot);
    __syncthreads();
    int before = 0, total = 0;
#pragma unroll
    for (int w = 0; w < Cfg::kWarps; ++w) {
      before += w < warp ? warp_counts[w] : 0;
      total += warp_counts[w];
    }
    const int64_t rank = rank_base + before + __popc(ballot & ((1u << lane) - 1u));
    if (is_step && rank >= first_rank && rank < first_rank + kChunkRows) chunk_rows[rank - first_rank] = row;
    if (record && row < num_rows) {
      p.output_slot[row] = is_step ? static_cast<int32_t>(rank) : -1;
      if (p.fused_tail) {
        if (is_step) p.step_row[rank] = static_cast<int32_t>(row);
        else p.out[row] = 0.f;
      }
    }
    rank_base += total;
    __syncthreads();
  }
  *steps = rank_base;
  const int64_t filled = rank_base - first_rank;
  return filled <= 0 ? 0 : (filled >= kChunkRows ? kChunkRows : static_cast<int>(filled));
}

// The slices [first, first + count) of this CTA's share of `total` slices split over `parts`.
__device__ __forceinline__ void share_of(int total, int parts, int part, int* first, int* count) {
  const int begin = static_cast<int>(static_cast<int64_t>(total) * part / parts);
  const int end = static_cast<int>(static_cast<int64_t>(total) * (part + 1) / parts);
  *first = begin;
  *count = end - begin;
}

// Accumulates one pipeline stage into acc: a_stage holds the item's unit rows [unit][k], b_warp
// this warp's rows [row][k] (both with row stride Cfg::kStride). The warp's 16-column blocks are
// those with index = warp_k (mod kWarpsK), in increasing order: the fixed K split of every kernel.
template <typename T, class Cfg>
__device__ __forceinline__ void multiply_stage(float (&acc)[kMaxSlices][Cfg::kNTiles][4], const T* a_stage,
                                               const T* b_warp, int slices) {
  constexpr int kStride = Cfg::kStride;
  const int lane = threadIdx.x & 31;
  const int warp_k = (threadIdx.x >> 5) % kWarpsK;
#pragma unroll
  for (int j = 0; j < Cfg::kBlocksPerWarp; ++j) {
    const int col = (j * kWarpsK + warp_k) * 16;
    uint32_t b[Cfg::kNTiles][2];
#pragma unroll
    for (int n = 0; n < Cfg::kNTiles; ++n)
      // Rows are stored [row][k]: the col-major B operand. Lanes 0-7 address k 0-7, 8-15 k 8-15.
      load_matrix_x2(b[n], b_warp + (n * 8 + lane % 8) * kStride + col + ((lane / 8) % 2) * 8);
#pragma unroll
    for (int m = 0; m < kMaxSlices; ++m) {
      if (m < slices) {
        uint32_t a[4];
        // Lane l addresses row l % 16, column half l / 16 of the 16x16 A tile (ldmatrix x4 order).
        load_matrix_x4(a, a_stage + (m * 16 + lane % 16) * kStride + col + (lane / 16) * 8);
#pragma unroll
        for (int n = 0; n < Cfg::kNTiles; ++n) mma_16816<T>(acc[m][n], a, b[n]);
      }
    }
  }
}

// Each math warp's pre-activations to shared memory: pre[warp_k][unit][row]. Lane (g, t) holds
// units g and g + 8 of each slice for rows 2t and 2t + 1 of each 8-row tile.
template <class Cfg>
__device__ __forceinline__ void store_preactivations(const float (&acc)[kMaxSlices][Cfg::kNTiles][4], int slices,
                                                     float* pre) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int warp_k = warp % kWarpsK;
  const int warp_n = warp / kWarpsK;
  const int g = lane >> 2;
  const int t = lane & 3;
#pragma unroll
  for (int m = 0; m < kMaxSlices; ++m) {
    if (m < slices) {
#pragma unroll
      for (int n = 0; n < Cfg::kNTiles; ++n) {
        const int row = warp_n * Cfg::kWarpRows + n * 8 + 2 * t;
        float* lo = pre + (warp_k * kMaxUnits + m * 16 + g) * Cfg::kPreStride + row;
        float* hi = lo + 8 * Cfg::kPreStride;
        *reinterpret_cast<float2*>(lo) = make_float2(acc[m][n][0], acc[m][n][1]);
        *reinterpret_cast<float2*>(hi) = make_float2(acc[m][n][2], acc[m][n][3]);
      }
    }
  }
}

// Epilogue in fp32 (SPEC: the activation is never rounded), one thread per (slice, row): adds the
// K-warps' pre-activations in warp order, then b1, ReLU and W2 over the slice's units in unit order,
// and writes partials[slice, chunk * kChunkRows + row] for the filled rows. b1 and w2 come from
// global memory, or, when unit_b1 / unit_w2 are given, from the item's units already in fp32 (a
// kernel that loaded them early keeps the load latency off its critical path; same values).
template <typename T, class Cfg>
__device__ __forceinline__ void finish_item(const HeadParams& p, int slice0, int slices, int chunk, int filled,
                                            const float* pre, const float* unit_b1 = nullptr,
                                            const float* unit_w2 = nullptr) {
  constexpr int kChunkRows = Cfg::kChunkRows;
  const int64_t unit0 = static_cast<int64_t>(slice0) * kSliceUnits;
  const T* b1 = static_cast<const T*>(p.b1);
  const T* w2 = static_cast<const T*>(p.w2);
  const bool early = unit_b1 != nullptr;
  for (int job = threadIdx.x; job < slices * kChunkRows; job += Cfg::kThreads) {
    const int m = job / kChunkRows;
    const int row = job % kChunkRows;
    if (row >= filled) continue;
    float total = 0.f;
#pragma unroll 4
    for (int u = m * 16; u < m * 16 + 16; ++u) {
      float sum = pre[u * Cfg::kPreStride + row];
#pragma unroll
      for (int k = 1; k < kWarpsK; ++k) sum += pre[(k * kMaxUnits + u) * Cfg::kPreStride + row];
      const float bias = early ? unit_b1[u] : to_float(b1[unit0 + u]);
      const float weight = early ? unit_w2[u] : to_float(w2[unit0 + u]);
      total += fmaxf(sum + bias, 0.f) * weight;
    }
    p.partials[static_cast<int64_t>(slice0 + m) * p.row_capacity + static_cast<int64_t>(chunk) * kChunkRows + row] = total;
  }
}

// Fetches the first Stages - 1 stages of an item's W1 rows into L2 (one bulk prefetch per unit).
template <typename T, class Cfg>
__device__ void prefetch_item(const HeadParams& p, int slice0, int slices) {
  const int64_t columns = min(static_cast<int64_t>(Cfg::kStages - 1) * Cfg::kBlockK, p.d);
  const T* w1 = static_cast<const T*>(p.w1);
  for (int u = threadIdx.x; u < slices * kSliceUnits; u += Cfg::kThreads)
    prefetch_l2(w1 + (static_cast<int64_t>(slice0) * kSliceUnits + u) * p.d, static_cast<uint32_t>(columns * sizeof(T)));
}

// One work item: `slices` (<= kMaxSlices) slices from slice0 against row chunk `chunk` (filled of
// Cfg::kChunkRows slots in use). Writes partials[s, chunk * kChunkRows + i] for each of its slices
// s = sum over the slice's 16 units j of w2[j] relu(W1[j] . h_i + b1[j]).
template <typename T, class Cfg>
__device__ void head_item(const HeadParams& p, int slice0, int slices, int chunk, int filled,
                          const int64_t* chunk_rows, unsigned char* smem) {
  constexpr int kBlockK = Cfg::kBlockK;
  constexpr int kStages = Cfg::kStages;
  constexpr int kStride = Cfg::kStride;
  constexpr int kChunkRows = Cfg::kChunkRows;
  constexpr int kPiecesPerRow = kBlockK / 8;
  T* a_smem = reinterpret_cast<T*>(smem);
  T* b_smem = a_smem + kStages * kMaxUnits * kStride;
  const int warp_n = (threadIdx.x >> 5) / kWarpsK;
  const int64_t d = p.d;
  const int64_t unit0 = static_cast<int64_t>(slice0) * kSliceUnits;
  const int units = slices * kSliceUnits;
  const T* w1 = static_cast<const T*>(p.w1);
  const T* hidden = static_cast<const T*>(p.hidden);
  const int num_k_blocks = static_cast<int>((d + kBlockK - 1) / kBlockK);

  // d % 8 == 0 (checked by the launcher), so each 16-byte piece is wholly inside or outside the row;
  // H % 16 == 0, so an item's units all exist. Trip counts are compile-time (unrolled) with a guard.
  auto load_stage = [&](int stage, int k_block) {
    const int64_t k0 = static_cast<int64_t>(k_block) * kBlockK;
    T* a_stage = a_smem + stage * kMaxUnits * kStride;
    T* b_stage = b_smem + stage * kChunkRows * kStride;
#pragma unroll
    for (int i = 0; i < (kMaxUnits * kPiecesPerRow + Cfg::kThreads - 1) / Cfg::kThreads; ++i) {
      const int piece = i * Cfg::kThreads + threadIdx.x;
      const int r = piece / kPiecesPerRow;
      const int col = (piece % kPiecesPerRow) * 8;
      if (r < units) {
        const bool valid = k0 + col < d;
        copy_16_async(a_stage + r * kStride + col, valid ? w1 + (unit0 + r) * d + k0 + col : w1, valid);
      }
    }
#pragma unroll
    for (int i = 0; i < (kChunkRows * kPiecesPerRow + Cfg::kThreads - 1) / Cfg::kThreads; ++i) {
      const int piece = i * Cfg::kThreads + threadIdx.x;
      if (kChunkRows * kPiecesPerRow % Cfg::kThreads == 0 || piece < kChunkRows * kPiecesPerRow) {
        const int r = piece / kPiecesPerRow;
        const int col = (piece % kPiecesPerRow) * 8;
        const int64_t row = r < filled ? chunk_rows[r] : -1;
        const bool valid = row >= 0 && k0 + col < d;
        copy_16_async(b_stage + r * kStride + col, valid ? hidden + row * p.hidden_stride + k0 + col : hidden, valid);
      }
    }
  };

  float acc[kMaxSlices][Cfg::kNTiles][4];
#pragma unroll
  for (int m = 0; m < kMaxSlices; ++m)
#pragma unroll
    for (int n = 0; n < Cfg::kNTiles; ++n) acc[m][n][0] = acc[m][n][1] = acc[m][n][2] = acc[m][n][3] = 0.f;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < num_k_blocks) load_stage(s, s);
    copy_commit();
  }
  for (int kb = 0; kb < num_k_blocks; ++kb) {
    copy_wait<kStages - 2>();
    __syncthreads();
    // The stage refilled here was consumed in iteration kb - 1, which every warp has left.
    const int next = kb + kStages - 1;
    if (next < num_k_blocks) load_stage(next % kStages, next);
    copy_commit();

    const int stage = kb % kStages;
    multiply_stage<T, Cfg>(acc, a_smem + stage * kMaxUnits * kStride,
                           b_smem + (stage * kChunkRows + warp_n * Cfg::kWarpRows) * kStride, slices);
  }
  copy_wait<0>();
  __syncthreads();

  store_preactivations<Cfg>(acc, slices, reinterpret_cast<float*>(smem));
  __syncthreads();
  finish_item<T, Cfg>(p, slice0, slices, chunk, filled, reinterpret_cast<const float*>(smem));
  // The next item overwrites chunk_rows and this memory.
  __syncthreads();
}

// Selects the rows of chunk `chunk` into chunk_rows; returns how many slots hold a row and sets
// *steps to the number of rows scored in all. For the decode source, the first call of CTA 0 also
// records every row's rank for the reduction.
template <class Cfg>
__device__ int select_chunk_rows(const HeadParams& p, int chunk, bool record_slots, int64_t* chunk_rows,
                                 int* warp_counts, int64_t* steps) {
  constexpr int kChunkRows = Cfg::kChunkRows;
  const int64_t first_rank = static_cast<int64_t>(chunk) * kChunkRows;
  if (p.source == kRowsMasked) return rank_masked_rows<Cfg>(p, first_rank, record_slots, chunk_rows, warp_counts, steps);
  *steps = p.num_rows;
  const int64_t left = p.num_rows - first_rank;
  const int filled = left >= kChunkRows ? kChunkRows : static_cast<int>(left);
  for (int r = threadIdx.x; r < kChunkRows; r += Cfg::kThreads) {
    int64_t row = -1;
    if (r < filled) {
      row = p.source == kRowsIndexed ? p.row_index[first_rank + r] : first_rank + r;
      // An index outside hidden is never read; the reduction reports it as NaN.
      if (row < 0 || row >= p.hidden_rows) row = -1;
    }
    chunk_rows[r] = row;
  }
  __syncthreads();
  return filled;
}

// Persistent grid. Dynamic shared memory holds the pipeline stages, then the pre-activations.
template <typename T, class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1) head_items_kernel(const HeadParams p) {
  extern __shared__ __align__(16) unsigned char dynamic_smem[];
  __shared__ int64_t chunk_rows[Cfg::kChunkRows];
  __shared__ int warp_counts[Cfg::kWarps];
  allow_next_grid();

  if (p.balanced) {
    // This CTA's slices, in passes of at most kMaxSlices (one pass at d <= 7680 on 132 SMs).
    int first, count;
    share_of(p.num_slices, gridDim.x, blockIdx.x, &first, &count);
    const int passes = (count + kMaxSlices - 1) / kMaxSlices;
    if (passes > 0) {
      int pass_first, pass_count;
      share_of(count, passes, 0, &pass_first, &pass_count);
      prefetch_item<T, Cfg>(p, first + pass_first, pass_count);
    }
    wait_for_prior_grids();
    for (int chunk = 0; chunk < p.num_chunks; ++chunk) {
      int64_t steps;
      const int filled = select_chunk_rows<Cfg>(p, chunk, chunk == 0 && blockIdx.x == 0, chunk_rows, warp_counts, &steps);
      // Decode chunks fill in rank order: after an empty one, all later ones are empty too.
      if (filled == 0) break;
      for (int pass = 0; pass < passes; ++pass) {
        int pass_first, pass_count;
        share_of(count, passes, pass, &pass_first, &pass_count);
        head_item<T, Cfg>(p, first + pass_first, pass_count, chunk, filled, chunk_rows, dynamic_smem);
      }
    }
    return;
  }

  // Grouped: kTileGroup tiles times every chunk run together, so both stay in L2.
  const int num_tiles = (p.num_slices + kTileSlices - 1) / kTileSlices;
  const int num_items = num_tiles * p.num_chunks;
  wait_for_prior_grids();
  for (int item = blockIdx.x; item < num_items; item += gridDim.x) {
    const int per_group = kTileGroup * p.num_chunks;
    const int group = item / per_group;
    const int group_tiles = min(kTileGroup, num_tiles - group * kTileGroup);
    const int within = item % per_group;
    const int tile = group * kTileGroup + within % group_tiles;
    const int chunk = within / group_tiles;
    int64_t steps;
    const int filled = select_chunk_rows<Cfg>(p, chunk, false, chunk_rows, warp_counts, &steps);
    const int slice0 = tile * kTileSlices;
    head_item<T, Cfg>(p, slice0, min(kTileSlices, p.num_slices - slice0), chunk, filled, chunk_rows, dynamic_smem);
  }
}

// One warp per output: the partials of all slices in a fixed order (lane-strided, then a fixed
// shuffle tree), plus b2. Non-step rows of the decode scorer get 0.0 (SPEC: the oracle's
// torch.where); out-of-range indices get NaN.
template <typename T>
__global__ void head_reduce_kernel(const HeadParams p) {
  // The next grid on the stream may start launching now (under PDL it waits for this one before
  // reading anything): the next decode step's W1 prefetch then overlaps this sum.
  allow_next_grid();
  wait_for_prior_grids();
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5);
  if (row >= p.num_rows) return;
  int64_t slot = row;
  if (p.source == kRowsMasked) {
    slot = p.output_slot[row];
    if (slot < 0) {
      if (lane == 0) p.out[row] = 0.f;
      return;
    }
  } else if (p.source == kRowsIndexed) {
    const int64_t index = p.row_index[row];
    if (index < 0 || index >= p.hidden_rows) {
      if (lane == 0) p.out[row] = __int_as_float(0x7fc00000);
      return;
    }
  }
  float total = 0.f;
  for (int s = lane; s < p.num_slices; s += 32) total += p.partials[static_cast<int64_t>(s) * p.row_capacity + slot];
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) total += __shfl_xor_sync(0xffffffffu, total, offset);
  if (lane == 0) p.out[row] = total + to_float(static_cast<const T*>(p.b2)[0]);
}

}  // namespace xbai
