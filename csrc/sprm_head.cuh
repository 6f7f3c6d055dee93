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
// the bytes (105 MB at d = 5120 in bf16), so each CTA owns a tile of kTileUnits hidden units and
// streams that slice of W1 once, through a multi-stage cp.async pipeline of 16-byte copies, while
// the selected rows (a few MB at most, L2 resident) stream beside it. Tensor cores (mma.sync
// m16n8k16, fp32 accumulation) multiply the tiles; the epilogue applies b1, ReLU and W2 in fp32 and
// leaves one partial sum per (tile, row). A second small kernel adds the partials of all tiles in
// tile order and b2. No float atomics anywhere: results are bitwise identical run to run and do
// not depend on how many CTAs ran or which CTA took which tile.
//
// Decode (kRowsMasked) decides on the device which rows are steps: every CTA ranks the mask itself
// (a few hundred bytes), so there is no host synchronization, no compaction launch, and a CTA whose
// chunk of step rows is empty returns before touching W1; with zero step rows W1 is never read.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace xbai {

enum RowSource : int { kRowsAll = 0, kRowsIndexed = 1, kRowsMasked = 2 };

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
// 64 hidden units per CTA gives 160 tiles at d = 5120, enough to spread over 132 SMs with two
// CTAs resident per SM. The tile is four 16-unit slices (one mma m16 each); partial sums are
// always added slice by slice in slice order, whatever the warp layout, so every configuration
// below gives the same bits.
constexpr int kTileUnits = 64;
constexpr int kSlices = kTileUnits / 16;
// Tiles of W1 that concurrent CTAs share in the packed order, so W1 and the rows both stay in L2.
constexpr int kTileGroup = 8;

// A tile configuration: ChunkRows selected rows per work item, BlockK columns per pipeline stage,
// Stages stages, warps arranged WarpsM (along hidden units) x kWarps / WarpsM (along rows).
template <int ChunkRowsV, int BlockKV, int StagesV, int WarpsMV>
struct TileConfig {
  static constexpr int kChunkRows = ChunkRowsV;
  static constexpr int kBlockK = BlockKV;
  static constexpr int kStages = StagesV;
  static constexpr int kWarpsM = WarpsMV;
  static constexpr int kWarpsN = kWarps / WarpsMV;
  static constexpr int kWarpUnits = kTileUnits / WarpsMV;
  static constexpr int kMTiles = kWarpUnits / 16;
  static constexpr int kWarpRows = ChunkRowsV / kWarpsN;
  static constexpr int kNTiles = kWarpRows / 8;
  // Rows padded by 16 bytes: ldmatrix's eight 16-byte row reads then fall into distinct banks.
  static constexpr int kStride = BlockKV + 8;
  static_assert(kWarpRows % 8 == 0 && kWarpUnits % 16 == 0 && BlockKV % 32 == 0 && StagesV >= 2, "tile shape");
  template <typename T>
  static constexpr size_t smem_bytes() {
    return static_cast<size_t>(kStages) * (kTileUnits + kChunkRows) * kStride * sizeof(T);
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
  float* partials;       // [num_tiles, row_capacity]
  int32_t* output_slot;  // kRowsMasked: [num_rows] rank among step rows, or -1
  float* out;            // [num_rows]
  int64_t row_capacity;  // num_chunks * chunk rows
  int num_tiles;
  int num_chunks;
};

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

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

template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Ranks the step rows of the mask with the whole CTA; stores in chunk_rows the hidden row of each
// step whose rank lies in [first_rank, first_rank + ChunkRows) and, when output_slot is given, the
// rank of every row (-1 for non-steps). Returns how many chunk slots were filled, the same on every
// thread. Ends with a barrier, so chunk_rows is ready to read.
template <int ChunkRows>
__device__ int rank_masked_rows(const bool* row_mask, int64_t num_rows, int64_t first_rank,
                                int64_t* chunk_rows, int32_t* output_slot, int* warp_counts) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  int64_t rank_base = 0;
  for (int64_t start = 0; start < num_rows; start += kThreads) {
    const int64_t row = start + threadIdx.x;
    const bool is_step = row < num_rows && row_mask[row];
    const unsigned ballot = __ballot_sync(0xffffffffu, is_step);
    if (lane == 0) warp_counts[warp] = __popc(ballot);
    __syncthreads();
    int before = 0, total = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      before += w < warp ? warp_counts[w] : 0;
      total += warp_counts[w];
    }
    const int64_t rank = rank_base + before + __popc(ballot & ((1u << lane) - 1u));
    if (is_step && rank >= first_rank && rank < first_rank + ChunkRows) chunk_rows[rank - first_rank] = row;
    if (output_slot != nullptr && row < num_rows) output_slot[row] = is_step ? static_cast<int32_t>(rank) : -1;
    rank_base += total;
    __syncthreads();
  }
  const int64_t filled = rank_base - first_rank;
  return filled <= 0 ? 0 : (filled >= ChunkRows ? ChunkRows : static_cast<int>(filled));
}

// One work item: hidden-unit tile `tile` against row chunk `chunk` (Cfg::kChunkRows rows). Writes
// partials[tile, chunk * kChunkRows + i] = sum over the tile's units j of w2[j] relu(W1[j] . h_i + b1[j]).
template <typename T, class Cfg>
__device__ void head_tile(const HeadParams& p, int tile, int chunk, int filled, const int64_t* chunk_rows,
                          T* a_smem, T* b_smem, float (*slice_sums)[Cfg::kChunkRows]) {
  constexpr int kBlockK = Cfg::kBlockK;
  constexpr int kStages = Cfg::kStages;
  constexpr int kStride = Cfg::kStride;
  constexpr int kChunkRows = Cfg::kChunkRows;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int warp_m = warp % Cfg::kWarpsM;
  const int warp_n = warp / Cfg::kWarpsM;
  const int64_t d = p.d;
  const int64_t units = 2 * d;
  const int64_t unit0 = static_cast<int64_t>(tile) * kTileUnits;
  const T* w1 = static_cast<const T*>(p.w1);
  const T* hidden = static_cast<const T*>(p.hidden);
  const int num_k_blocks = static_cast<int>((d + kBlockK - 1) / kBlockK);

  // d % 8 == 0 (checked by the launcher), so each 16-byte piece is wholly inside or outside the row.
  auto load_stage = [&](int stage, int k_block) {
    const int64_t k0 = static_cast<int64_t>(k_block) * kBlockK;
    T* a_stage = a_smem + stage * kTileUnits * kStride;
    T* b_stage = b_smem + stage * kChunkRows * kStride;
#pragma unroll
    for (int piece = threadIdx.x; piece < kTileUnits * (kBlockK / 8); piece += kThreads) {
      const int r = piece / (kBlockK / 8);
      const int col = (piece % (kBlockK / 8)) * 8;
      const int64_t unit = unit0 + r;
      const bool valid = unit < units && k0 + col < d;
      copy_16_async(a_stage + r * kStride + col, valid ? w1 + unit * d + k0 + col : w1, valid);
    }
#pragma unroll
    for (int piece = threadIdx.x; piece < kChunkRows * (kBlockK / 8); piece += kThreads) {
      const int r = piece / (kBlockK / 8);
      const int col = (piece % (kBlockK / 8)) * 8;
      const int64_t row = r < filled ? chunk_rows[r] : -1;
      const bool valid = row >= 0 && k0 + col < d;
      copy_16_async(b_stage + r * kStride + col, valid ? hidden + row * p.hidden_stride + k0 + col : hidden, valid);
    }
  };

  float acc[Cfg::kMTiles][Cfg::kNTiles][4];
#pragma unroll
  for (int m = 0; m < Cfg::kMTiles; ++m)
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
    const T* a_warp = a_smem + (stage * kTileUnits + warp_m * Cfg::kWarpUnits) * kStride;
    const T* b_warp = b_smem + (stage * kChunkRows + warp_n * Cfg::kWarpRows) * kStride;
#pragma unroll
    for (int k32 = 0; k32 < kBlockK / 32; ++k32) {
      uint32_t a_lo[Cfg::kMTiles][4], a_hi[Cfg::kMTiles][4];
#pragma unroll
      for (int m = 0; m < Cfg::kMTiles; ++m) {
        // Lane l addresses row l % 16, column half l / 16 of a 16x16 A tile (ldmatrix x4 order).
        const T* a_rows = a_warp + (m * 16 + lane % 16) * kStride + k32 * 32 + (lane / 16) * 8;
        load_matrix_x4(a_lo[m], a_rows);
        load_matrix_x4(a_hi[m], a_rows + 16);
      }
#pragma unroll
      for (int n = 0; n < Cfg::kNTiles; ++n) {
        // Rows are stored [row][k]: the col-major B operand of mma; one x4 covers k32 of 8 rows.
        uint32_t b[4];
        load_matrix_x4(b, b_warp + (n * 8 + lane % 8) * kStride + k32 * 32 + (lane / 8) * 8);
#pragma unroll
        for (int m = 0; m < Cfg::kMTiles; ++m) {
          mma_16816<T>(acc[m][n], a_lo[m], b[0], b[1]);
          mma_16816<T>(acc[m][n], a_hi[m], b[2], b[3]);
        }
      }
    }
  }
  copy_wait<0>();

  // Epilogue in fp32 (SPEC: the activation is never rounded). Lane (g, t) holds units g and g + 8
  // of each 16-unit slice for rows 2t and 2t + 1 of each 8-row tile.
  const int g = lane >> 2;
  const int t = lane & 3;
  const T* b1 = static_cast<const T*>(p.b1);
  const T* w2 = static_cast<const T*>(p.w2);
#pragma unroll
  for (int m = 0; m < Cfg::kMTiles; ++m) {
    const int slice = warp_m * Cfg::kMTiles + m;
    const int64_t unit_lo = unit0 + slice * 16 + g;
    const int64_t unit_hi = unit_lo + 8;
    const float bias_lo = unit_lo < units ? to_float(b1[unit_lo]) : 0.f;
    const float bias_hi = unit_hi < units ? to_float(b1[unit_hi]) : 0.f;
    const float out_w_lo = unit_lo < units ? to_float(w2[unit_lo]) : 0.f;
    const float out_w_hi = unit_hi < units ? to_float(w2[unit_hi]) : 0.f;
#pragma unroll
    for (int n = 0; n < Cfg::kNTiles; ++n) {
      float even = fmaxf(acc[m][n][0] + bias_lo, 0.f) * out_w_lo + fmaxf(acc[m][n][2] + bias_hi, 0.f) * out_w_hi;
      float odd = fmaxf(acc[m][n][1] + bias_lo, 0.f) * out_w_lo + fmaxf(acc[m][n][3] + bias_hi, 0.f) * out_w_hi;
#pragma unroll
      for (int offset = 4; offset < 32; offset <<= 1) {
        even += __shfl_xor_sync(0xffffffffu, even, offset);
        odd += __shfl_xor_sync(0xffffffffu, odd, offset);
      }
      if (g == 0) {
        const int row = warp_n * Cfg::kWarpRows + n * 8 + 2 * t;
        slice_sums[slice][row] = even;
        slice_sums[slice][row + 1] = odd;
      }
    }
  }
  __syncthreads();
  for (int r = threadIdx.x; r < filled; r += kThreads) {
    float total = 0.f;
#pragma unroll
    for (int slice = 0; slice < kSlices; ++slice) total += slice_sums[slice][r];
    p.partials[static_cast<int64_t>(tile) * p.row_capacity + static_cast<int64_t>(chunk) * kChunkRows + r] = total;
  }
  // The next item overwrites chunk_rows, slice_sums and the stages.
  __syncthreads();
}

// Persistent grid over work items (hidden-unit tile, row chunk). Dynamic shared memory holds the
// pipeline stages of W1 and row tiles.
template <typename T, class Cfg>
__global__ void __launch_bounds__(kThreads, 2) head_tiles_kernel(const HeadParams p) {
  constexpr int ChunkRows = Cfg::kChunkRows;
  extern __shared__ __align__(16) unsigned char dynamic_smem[];
  T* a_smem = reinterpret_cast<T*>(dynamic_smem);
  T* b_smem = a_smem + Cfg::kStages * kTileUnits * Cfg::kStride;
  __shared__ int64_t chunk_rows[ChunkRows];
  __shared__ float slice_sums[kSlices][ChunkRows];
  __shared__ int warp_counts[kWarps];

  const int num_items = p.num_tiles * p.num_chunks;
  bool first = true;
  for (int item = blockIdx.x; item < num_items; item += gridDim.x) {
    int tile, chunk;
    if (p.source == kRowsMasked) {
      // Chunk-major: the CTAs that find their chunk empty leave at once, and the rest stay balanced.
      chunk = item / p.num_tiles;
      tile = item % p.num_tiles;
    } else {
      // Grouped: kTileGroup W1 tiles times every chunk run together, so both stay in L2.
      const int per_group = kTileGroup * p.num_chunks;
      const int group = item / per_group;
      const int group_tiles = min(kTileGroup, p.num_tiles - group * kTileGroup);
      const int within = item % per_group;
      tile = group * kTileGroup + within % group_tiles;
      chunk = within / group_tiles;
    }
    const int64_t first_rank = static_cast<int64_t>(chunk) * ChunkRows;
    int filled;
    if (p.source == kRowsMasked) {
      // CTA 0 also records every row's rank for the reduction; it always runs item 0.
      filled = rank_masked_rows<ChunkRows>(p.row_mask, p.num_rows, first_rank, chunk_rows,
                                           first && blockIdx.x == 0 ? p.output_slot : nullptr, warp_counts);
      // Later items of this CTA have chunks at least as large: none has work either.
      if (filled == 0) break;
    } else {
      const int64_t left = p.num_rows - first_rank;
      filled = left >= ChunkRows ? ChunkRows : static_cast<int>(left);
      for (int r = threadIdx.x; r < ChunkRows; r += kThreads) {
        int64_t row = -1;
        if (r < filled) {
          row = p.source == kRowsIndexed ? p.row_index[first_rank + r] : first_rank + r;
          // An index outside hidden is never read; the reduction reports it as NaN.
          if (row < 0 || row >= p.hidden_rows) row = -1;
        }
        chunk_rows[r] = row;
      }
      __syncthreads();
    }
    first = false;
    head_tile<T, Cfg>(p, tile, chunk, filled, chunk_rows, a_smem, b_smem, slice_sums);
  }
}

// One warp per output: the partials of all tiles in tile order, plus b2. Non-step rows of the
// decode scorer get 0.0 (SPEC: the oracle's torch.where); out-of-range indices get NaN.
template <typename T>
__global__ void head_reduce_kernel(const HeadParams p) {
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
  for (int tile = lane; tile < p.num_tiles; tile += 32) total += p.partials[static_cast<int64_t>(tile) * p.row_capacity + slot];
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) total += __shfl_xor_sync(0xffffffffu, total, offset);
  if (lane == 0) p.out[row] = total + to_float(static_cast<const T*>(p.b2)[0]);
}

}  // namespace xbai
