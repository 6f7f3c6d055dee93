// The sm_90 streaming kernel of the SPRM head: W1 by the tensor-memory accelerator (TMA), the scored
// rows by 16-byte cp.async beside it, both into one mbarrier ring; optionally the deterministic sum
// of the slices by the last CTA to finish (no second launch).
//
// Why this shape (docs/kernels.md): a W1 stream fed by per-thread copies is bound by instruction
// issue, and one cp.async.bulk has a fixed cost whatever its size, so W1 must arrive in few, large
// copies. A 2-D TMA box of [box units x 64 columns] is one instruction for
// up to 10 KB; a stage is two or four boxes (128 or 256 columns). The boxes land 128-byte swizzled
// (16-byte chunk c of row r at chunk c ^ (r % 8)), so ldmatrix's eight row reads hit distinct banks;
// the tensor map asks for no L2 promotion (W1 is read once per call). The scored rows
// cannot come by TMA (they are gathered: hidden rows named by a mask or an index); 1-4 copy warps
// copy their 256-512 bytes per row and stage, from addresses computed once per item, and they
// stream with W1 instead of being copied whole before the first multiply, so up to 64 rows fit.
//
// Work split. CTA c owns slices [c * P, (c + 1) * P) for a fixed P (the host picks the smallest P
// that fits the grid in one wave, as a whole number of boxes of at most kMaxSlices slices), so every
// CTA but the last streams the same bytes and all TMA boxes have one shape. The math is the one of
// head_items_kernel, with the same K split and the same sum orders: the logits have the same bits as
// every other schedule of this module. The math warps' loop is straight-line on purpose: it is on the
// critical path, where every runtime guard costs time on each stage. At 64 rows the math warps are two
// warpgroups that multiply by wgmma straight from the ring (warpgroup_mma.cuh), each K residue in its
// own accumulators: the same sums in the same order, so the same bits as mma.sync.
//
// What bounds it: at B <= 16 the W1 stream itself, close to W1's copy floor. At B = 256 (64 rows) the
// item is longer (the rows' copies share the ring, and the epilogue grows) and the gap between calls
// holds the 256-row ranking and the second kernel's reduction; the ring depth 64 rows need is all the
// shared memory holds.
#pragma once

#include <cuda.h>

#include "sprm_head.cuh"
#include "warpgroup_mma.cuh"

namespace xbai {

// A stage is Cfg::kBlockK columns (128 or 256): kBlockK / 64 TMA boxes of 64 columns (128 swizzled
// bytes per row) for W1, and as many [rows x 64 columns] tiles of the rows beside them.
constexpr int kBoxColumns = 64;
constexpr int kSwizzleBytes = 128;
// Most ring stages a CTA keeps (the shared memory left usually allows fewer).
constexpr int kStreamMaxStages = 16;
// Ranks summed per round of the fused tail: the per-lane sums of 64 ranks take 8 KB of the ring.
constexpr int kTailRanks = 64;
// Slices each lane of the fused tail loads before adding them (one L2 round trip up to d = 6144).
constexpr int kTailLoads = 24;

// Floats of padding per unit in the epilogue's pre-activation layout, so its stores spread over the
// banks. A warpgroup store puts four units (two apart) and eight rows in one instruction: with 64
// floats per unit the four units shared a bank, a 4-way conflict on every store (most of the
// epilogue's time at 64 rows), and 68 put the 32 lanes on 32 banks. An mma.sync warp's
// float2 stores put four units one apart in each half-warp: rows + 8 floats per unit spread them at
// 16 and 32 rows.
template <bool GroupMma>
constexpr int kStreamPrePad = GroupMma && kGroupMmaCompiled ? 4 : 8;

// ProducerWarps warps issue the copies (the first also issues W1's boxes): one carries a few rows,
// 64 rows need four (one warp alone spends about a stage's whole time budget issuing 64 rows' copies,
// whole budget).
// GroupMma: the math warps multiply by warpgroup MMA (64 rows, sm_90a; warpgroup_mma.cuh), each
// warpgroup taking kWarpsK / warpgroups of the K residues, so the K split and every sum stay those of
// the mma.sync warps; elsewhere (other targets) the same configuration runs mma.sync.
template <int ChunkRowsV, int WarpsNV, int StageColumnsV, int ProducerWarpsV, bool GroupMmaV = false>
struct StreamConfig : TileConfig<ChunkRowsV, StageColumnsV, kStreamMaxStages, WarpsNV, ProducerWarpsV,
                                 kStreamPrePad<GroupMmaV>> {
  using Base = TileConfig<ChunkRowsV, StageColumnsV, kStreamMaxStages, WarpsNV, ProducerWarpsV,
                          kStreamPrePad<GroupMmaV>>;
  static constexpr bool kGroupMma = GroupMmaV && kGroupMmaCompiled;
  static constexpr int kGroups = Base::kMathWarps / 4;
  static constexpr int kGroupResidues = kWarpsK / (kGroups > 0 ? kGroups : 1);
  static_assert(!GroupMmaV || (ChunkRowsV == 64 && Base::kMathWarps % 4 == 0 && kWarpsK % kGroups == 0),
                "warpgroup MMA: 64 rows, whole warpgroups, each an equal share of the K residues");
};

// Bytes of one ring stage: kBlockK / 64 boxes of W1 (box_units rows) and as many tiles of the rows,
// 128 bytes per row each. The launcher sizes the ring with it, the kernel lays the ring out by it.
template <class Cfg>
__host__ __device__ constexpr uint32_t stream_stage_bytes(int box_units) {
  return static_cast<uint32_t>(Cfg::kBlockK / kBoxColumns * (box_units + Cfg::kChunkRows) * kSwizzleBytes);
}

// Byte offset of 16-byte chunk `chunk` (0-7) of row `row` in a [rows x 64 columns] tile, as TMA's
// 128-byte swizzle lays it out (the tile starts on a 1024-byte boundary).
__device__ __forceinline__ uint32_t swizzled(int row, int chunk) {
  return static_cast<uint32_t>(row * kSwizzleBytes + ((chunk ^ (row & 7)) << 4));
}

// The fused tail's ticket counter, one per device (module globals are per device). The last CTA of
// a call takes ticket grid - 1 and atomicInc's wrap leaves the counter at 0 for the next call, so
// calls on one device must not overlap in time (one stream, as decode engines run it).
__device__ unsigned int g_stream_tickets[1];

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ uint32_t dynamic_smem_bytes() {
  uint32_t bytes;
  asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(bytes));
  return bytes;
}

// Loads the [box rows x 64 columns] box of `map` at (column x, row y) into dst; the bytes count
// toward `bar`'s transaction. Rows past the tensor arrive as zeros (the last CTA's box).
__device__ __forceinline__ void tma_load_2d(void* dst, const CUtensorMap* map, int x, int y, uint64_t* bar,
                                            uint64_t policy) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint"
      " [%0], [%1, {%2, %3}], [%4], %5;\n" ::"r"(smem_address(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(x), "r"(y), "r"(smem_address(bar)), "l"(policy)
      : "memory");
}
// Asks L2 to fetch the box of `map` at (column x, row y); a hint only, nothing lands in shared memory.
__device__ __forceinline__ void prefetch_box_l2(const CUtensorMap* map, int x, int y) {
  asm volatile("cp.async.bulk.prefetch.tensor.2d.L2.global.tile [%0, {%1, %2}];\n" ::"l"(
                   reinterpret_cast<uint64_t>(map)),
               "r"(x), "r"(y)
               : "memory");
}
__device__ __forceinline__ void prefetch_tensor_map(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}
// Arrives on `bar` once every cp.async this thread issued before has landed (counted among the
// barrier's expected arrivals: .noinc).
__device__ __forceinline__ void copies_arrive_on(uint64_t* bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(smem_address(bar)) : "memory");
}

// Where a CTA's ring lives and how it turns.
struct Ring {
  unsigned char* base;   // 1024-byte aligned
  uint32_t stages;       // in use, <= kStreamMaxStages
  uint32_t stage_bytes;  // stream_stage_bytes<Cfg>(box_units)
  int box_units;         // W1 rows per TMA box
  uint64_t* full;        // [stages]: TMA bytes landed and the producers' row copies done
  uint64_t* empty;       // [stages]: every math warp done reading
  float* unit_b1;        // [kMaxUnits]: b1 and w2 of the item's units, fp32, for the epilogue
  float* unit_w2;
};

// 16-byte global->shared copy of a piece known to lie inside its row (no zero-fill operand).
__device__ __forceinline__ void copy_16_async(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src));
}

// The math warps of a warpgroup-MMA configuration over one item's stages: warpgroup g multiplies
// the 16-column blocks j * kWarpsK + g * kGroupResidues + q of each stage's boxes j into acc[q], so
// every K residue takes its blocks in increasing order, as the mma.sync warps do. A stage is
// released as soon as the MMAs that read it are done: they take about a tenth of a stage's time, and
// holding each stage until the next one's MMAs were issued kept one of the six stages from the
// producer, which shows most when every row is a step.
template <typename T, class Cfg>
__device__ void multiply_item_by_warpgroups(const Ring& ring, uint32_t iteration, int k_chunks,
                                            float (&acc)[Cfg::kGroupResidues][kGroupMmaUnits / 2]);

// Each warpgroup's pre-activations to shared memory, in store_preactivations' layout
// pre[residue][unit][row] (the accumulator layout: warpgroup_mma.cuh).
template <class Cfg>
__device__ __forceinline__ void store_group_preactivations(const float (&acc)[Cfg::kGroupResidues][kGroupMmaUnits / 2],
                                                           int slices, float* pre) {
  static_assert(kGroupMmaUnits == kMaxUnits, "one wgmma covers an item's units");
  constexpr int kStride = Cfg::kPreStride;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int row = (warp % 4) * 16 + lane / 4;
  const int unit_pair = 2 * (lane % 4);
#pragma unroll
  for (int q = 0; q < Cfg::kGroupResidues; ++q) {
    float* residue = pre + ((warp / 4) * Cfg::kGroupResidues + q) * kMaxUnits * kStride;
#pragma unroll
    for (int block = 0; block < kGroupMmaUnits / 8; ++block) {
      if (block < 2 * slices) {
        const int unit = 8 * block + unit_pair;
        residue[unit * kStride + row] = acc[q][4 * block];
        residue[(unit + 1) * kStride + row] = acc[q][4 * block + 1];
        residue[unit * kStride + row + 8] = acc[q][4 * block + 2];
        residue[(unit + 1) * kStride + row + 8] = acc[q][4 * block + 3];
      }
    }
  }
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
template <typename T, class Cfg>
__device__ void multiply_item_by_warpgroups(const Ring& ring, uint32_t iteration, int k_chunks,
                                            float (&acc)[Cfg::kGroupResidues][kGroupMmaUnits / 2]) {
  constexpr int kBoxes = Cfg::kBlockK / kBoxColumns;
  const int lane = threadIdx.x & 31;
  const int group = (threadIdx.x >> 5) / 4;
  const uint32_t w1_box_bytes = static_cast<uint32_t>(ring.box_units) * kSwizzleBytes;
  const uint32_t rows_offset = kBoxes * w1_box_bytes;
  const uint32_t ring_address = smem_address(ring.base);
  for (int t = 0; t < k_chunks; ++t) {
    const uint32_t i = iteration + t;
    const uint32_t stage = i % ring.stages;
    barrier_wait(&ring.full[stage], (i / ring.stages) & 1);
    // The rows came by cp.async (the generic proxy); the tensor cores read them through the async one.
    fence_shared_for_copies();
    __syncwarp();
    const uint32_t stage_address = ring_address + stage * ring.stage_bytes;
#pragma unroll
    for (int q = 0; q < Cfg::kGroupResidues; ++q) pin_accumulators(acc[q]);
    group_mma_fence();
#pragma unroll
    for (int j = 0; j < kBoxes; ++j) {
#pragma unroll
      for (int q = 0; q < Cfg::kGroupResidues; ++q) {
        // Block j * kWarpsK + residue lies at chunks 2 residue and 2 residue + 1 of box j: 32 bytes a residue.
        const uint32_t k_offset = static_cast<uint32_t>(group * Cfg::kGroupResidues + q) * 32;
        const uint32_t rows_tile = stage_address + rows_offset + j * Cfg::kChunkRows * kSwizzleBytes;
        // A box of fewer than 80 units: the MMA reads on into the next box or the row tiles of the
        // same stage (landed, in bounds) and those units' sums are never stored.
        group_mma_64x80<T>(acc[q], swizzled_tile_descriptor(rows_tile + k_offset),
                           swizzled_tile_descriptor(stage_address + j * w1_box_bytes + k_offset));
      }
    }
    group_mma_commit();
#pragma unroll
    for (int q = 0; q < Cfg::kGroupResidues; ++q) pin_accumulators(acc[q]);
    group_mma_wait<0>();
#pragma unroll
    for (int q = 0; q < Cfg::kGroupResidues; ++q) pin_accumulators(acc[q]);
    if (lane == 0) barrier_arrive(&ring.empty[stage]);
  }
}
#endif

// One work item: `slices` slices from slice0 against row chunk `chunk` (`filled` rows), streamed in
// ceil(d / kBlockK) stages. `iteration` counts the ring stages this CTA ran before. Same sums as head_item.
template <typename T, class Cfg>
__device__ void stream_item(const HeadParams& p, const CUtensorMap* w1_map, const Ring& ring, int slice0, int slices,
                            int chunk, int filled, const int64_t* chunk_rows, uint32_t iteration) {
  constexpr int kChunkRows = Cfg::kChunkRows;
  constexpr int kStageK = Cfg::kBlockK;
  constexpr int kBoxes = kStageK / kBoxColumns;
  constexpr int kPiecesPerRow = kStageK / 8;
  constexpr int kProducerThreads = Cfg::kThreads - 32 * Cfg::kMathWarps;
  constexpr int kRowsPerRound = kProducerThreads / kPiecesPerRow;
  constexpr int kCopies = kChunkRows / kRowsPerRound;
  static_assert(kStageK % kBoxColumns == 0 && kProducerThreads % kPiecesPerRow == 0 &&
                    kChunkRows % kRowsPerRound == 0 && kCopies <= 32,
                "stage shape");
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int k_chunks = static_cast<int>((p.d + kStageK - 1) / kStageK);
  const uint32_t w1_box_bytes = static_cast<uint32_t>(ring.box_units) * kSwizzleBytes;
  const uint32_t rows_offset = kBoxes * w1_box_bytes;
  float acc[kMaxSlices][Cfg::kNTiles][4];
#pragma unroll
  for (int m = 0; m < kMaxSlices; ++m)
#pragma unroll
    for (int n = 0; n < Cfg::kNTiles; ++n) acc[m][n][0] = acc[m][n][1] = acc[m][n][2] = acc[m][n][3] = 0.f;
  // The warpgroup MMA's accumulators instead (Cfg::kGroupMma; the unused set is optimized away).
  float group_acc[Cfg::kGroupResidues][kGroupMmaUnits / 2];
#pragma unroll
  for (int q = 0; q < Cfg::kGroupResidues; ++q)
#pragma unroll
    for (int e = 0; e < kGroupMmaUnits / 2; ++e) group_acc[q][e] = 0.f;
  // The epilogue's b1 and w2, asked for now so their latency hides behind the stream.
  if (threadIdx.x < slices * kSliceUnits) {
    const int64_t unit = static_cast<int64_t>(slice0) * kSliceUnits + threadIdx.x;
    ring.unit_b1[threadIdx.x] = to_float(static_cast<const T*>(p.b1)[unit]);
    ring.unit_w2[threadIdx.x] = to_float(static_cast<const T*>(p.w2)[unit]);
  }

  if (warp >= Cfg::kMathWarps) {
    // Producers. Thread x copies 16-byte piece x % kPiecesPerRow of rows x / kPiecesPerRow + i *
    // kRowsPerRound. Each copy must cost few instructions (a loop that re-derives its addresses per
    // stage is issue-bound at 64 rows and runs several times slower): the sources are computed once
    // per item, and a stage only adds its column offset.
    const int x = threadIdx.x - 32 * Cfg::kMathWarps;
    const uint64_t policy = evict_first_policy();
    const T* hidden = static_cast<const T*>(p.hidden);
    const int piece = x % kPiecesPerRow;
    const int64_t piece_col = static_cast<int64_t>(piece) * 8;
    // Each copy's source as a count of 16-byte pieces from `hidden` (32 bits: the launcher checks
    // hidden spans fewer than 2^32 of them), so 64 rows' worth stays in registers.
    uint32_t source[kCopies];
    uint32_t copied = 0;  // bit i: copy i has a row (filled, and not an out-of-range index)
#pragma unroll
    for (int i = 0; i < kCopies; ++i) {
      const int r = i * kRowsPerRound + x / kPiecesPerRow;
      const int64_t row = r < filled ? chunk_rows[r] : -1;
      copied |= row >= 0 ? 1u << i : 0u;
      source[i] = static_cast<uint32_t>(((row >= 0 ? row : 0) * p.hidden_stride + piece_col) / 8);
    }
    // Copy i's swizzled place in the stage (a few integer operations; kept out of registers).
    const uint32_t piece_offset = rows_offset + (piece / 8) * kChunkRows * kSwizzleBytes;
    auto target = [&](int i) {
      return piece_offset + swizzled(i * kRowsPerRound + x / kPiecesPerRow, piece % 8);
    };
    for (int t = 0; t < k_chunks; ++t) {
      const uint32_t i = iteration + t;
      const uint32_t stage = i % ring.stages;
      // The first pass over the ring finds every stage free (waiting on the phase before the first).
      barrier_wait(&ring.empty[stage], ((i / ring.stages) & 1) ^ 1);
      unsigned char* base = ring.base + stage * ring.stage_bytes;
      const int col0 = t * kStageK;
      if (x == 0) {
        barrier_arrive_expect_bytes(&ring.full[stage], kBoxes * w1_box_bytes);
#pragma unroll
        for (int box = 0; box < kBoxes; ++box)
          tma_load_2d(base + box * w1_box_bytes, w1_map, col0 + box * kBoxColumns, slice0 * kSliceUnits,
                      &ring.full[stage], policy);
      }
      const uint32_t base_address = smem_address(base);
      const uint4* stage_source = reinterpret_cast<const uint4*>(hidden + col0);
      if (col0 + kStageK <= p.d) {
#pragma unroll
        for (int c = 0; c < kCopies; ++c)
          if (copied >> c & 1u) copy_16_async(base_address + target(c), stage_source + source[c]);
      } else {
        // The last stage of a d that is not a multiple of kStageK: pieces past d are zero-filled
        // (W1's box is zero there, and 0 * stale bits could be NaN).
        const bool valid = col0 + piece_col < p.d;
#pragma unroll
        for (int c = 0; c < kCopies; ++c)
          if (copied >> c & 1u)
            copy_16_async(base + target(c), valid ? static_cast<const void*>(stage_source + source[c]) : hidden, valid);
      }
      copies_arrive_on(&ring.full[stage]);
    }
  } else if constexpr (Cfg::kGroupMma) {
    multiply_item_by_warpgroups<T, Cfg>(ring, iteration, k_chunks, group_acc);
  } else {
    const int warp_k = warp % kWarpsK;
    const int warp_n = warp / kWarpsK;
    for (int t = 0; t < k_chunks; ++t) {
      const uint32_t i = iteration + t;
      const uint32_t stage = i % ring.stages;
      barrier_wait(&ring.full[stage], (i / ring.stages) & 1);
      const unsigned char* base = ring.base + stage * ring.stage_bytes;
      // Column block j * kWarpsK + warp_k of the stage lies in box j, at chunks 2 warp_k and 2 warp_k + 1:
      // this warp's blocks in increasing order, the fixed K split of every kernel. (Straight-line code:
      // this loop's speed is on the critical path, and a runtime guard here costs time on every stage.)
#pragma unroll
      for (int j = 0; j < kBoxes; ++j) {
        const unsigned char* a_box = base + j * w1_box_bytes;
        const unsigned char* b_box = base + rows_offset + j * kChunkRows * kSwizzleBytes;
        uint32_t b[Cfg::kNTiles][2];
#pragma unroll
        for (int n = 0; n < Cfg::kNTiles; ++n)
          load_matrix_x2(b[n], b_box + swizzled(warp_n * Cfg::kWarpRows + n * 8 + lane % 8, 2 * warp_k + (lane / 8) % 2));
#pragma unroll
        for (int m = 0; m < kMaxSlices; ++m) {
          if (m < slices) {
            uint32_t a[4];
            load_matrix_x4(a, a_box + swizzled(m * 16 + lane % 16, 2 * warp_k + lane / 16));
#pragma unroll
            for (int n = 0; n < Cfg::kNTiles; ++n) mma_16816<T>(acc[m][n], a, b[n]);
          }
        }
      }
      // Every lane's ldmatrix reads of the stage are done before the warp releases it.
      __syncwarp();
      if (lane == 0) barrier_arrive(&ring.empty[stage]);
    }
  }
  // Every stage of the item has landed and been read: the ring now holds the pre-activations.
  __syncthreads();
  float* pre = reinterpret_cast<float*>(ring.base);
  if (warp < Cfg::kMathWarps) {
    if constexpr (Cfg::kGroupMma)
      store_group_preactivations<Cfg>(group_acc, slices, pre);
    else
      store_preactivations<Cfg>(acc, slices, pre);
  }
  __syncthreads();
  finish_item<T, Cfg>(p, slice0, slices, chunk, filled, pre, ring.unit_b1, ring.unit_w2);
  // The next item's copies overwrite this memory (and chunk_rows): order these reads and writes first.
  fence_shared_for_copies();
  __syncthreads();
}

// The last CTA's sum: out[step_row[r]] = sum over slices of partials[slice, r] + b2 for every step
// rank r, in head_reduce_kernel's order (lane l adds the slices l, l + 32, ... in turn, then the same
// xor tree), so both tails give the same bits. The lane sums are formed with consecutive threads on
// consecutive ranks (coalesced reads), parked in shared memory, and the tree runs one warp per rank.
// `b2` was loaded at the start; with one chunk the step rows are still in chunk_rows (in rank order).
template <typename T, class Cfg>
__device__ void sum_step_logits(const HeadParams& p, int64_t steps, float b2, const int64_t* chunk_rows,
                                float* lane_sums) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  for (int64_t first = 0; first < steps; first += kTailRanks) {
    const int ranks = static_cast<int>(steps - first < kTailRanks ? steps - first : kTailRanks);
    for (int job = threadIdx.x; job < 32 * ranks; job += Cfg::kThreads) {
      const int l = job / ranks;
      const int r = job % ranks;
      const float* column = p.partials + first + r;
      float total = 0.f;
      // All loads of a batch first, then the adds in slice order: one L2 round trip per batch.
      for (int s0 = l; s0 < p.num_slices; s0 += 32 * kTailLoads) {
        float value[kTailLoads];
#pragma unroll
        for (int q = 0; q < kTailLoads; ++q) {
          const int s = s0 + 32 * q;
          value[q] = s < p.num_slices ? __ldcg(column + static_cast<int64_t>(s) * p.row_capacity) : 0.f;
        }
#pragma unroll
        for (int q = 0; q < kTailLoads; ++q)
          if (s0 + 32 * q < p.num_slices) total += value[q];
      }
      lane_sums[l * kTailRanks + r] = total;
    }
    __syncthreads();
    for (int r = warp; r < ranks; r += Cfg::kWarps) {
      float total = lane_sums[lane * kTailRanks + r];
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) total += __shfl_xor_sync(0xffffffffu, total, offset);
      if (lane == 0) {
        const int64_t rank = first + r;
        p.out[steps <= Cfg::kChunkRows ? chunk_rows[rank] : __ldcg(p.step_row + rank)] = total + b2;
      }
    }
    __syncthreads();
  }
}
#endif

// Persistent grid of one CTA per SM over the slices (see the top of this file); sm_90+ only, the
// launcher checks the loaded code's PTX version first. Dynamic shared memory: the ring (1024-byte
// aligned), reused by each item's epilogue and by the fused tail.
template <typename T, class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1)
    head_stream_kernel(const HeadParams p, const __grid_constant__ CUtensorMap w1_map) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(16) unsigned char dynamic_smem[];
  __shared__ int64_t chunk_rows[Cfg::kChunkRows];
  __shared__ int warp_counts[Cfg::kWarps];
  __shared__ __align__(8) uint64_t full[kStreamMaxStages];
  __shared__ __align__(8) uint64_t empty[kStreamMaxStages];
  __shared__ unsigned int ticket;
  __shared__ float unit_b1[kMaxUnits];
  __shared__ float unit_w2[kMaxUnits];
  // The next grid may start launching: with the fused tail it is the next call's streaming kernel,
  // whose CTAs then take each SM this grid leaves and prefetch their W1. The second-kernel tail is
  // let in only once this CTA's items are done (below).
  if (p.fused_tail) allow_next_grid();
  Ring ring;
  const uint32_t skew = (1024u - (smem_address(dynamic_smem) & 1023u)) & 1023u;
  ring.base = dynamic_smem + skew;
  ring.box_units = p.box_slices * kSliceUnits;
  ring.stage_bytes = stream_stage_bytes<Cfg>(ring.box_units);
  const uint32_t room = (dynamic_smem_bytes() - skew) / ring.stage_bytes;
  ring.stages = room < kStreamMaxStages ? room : kStreamMaxStages;
  ring.full = full;
  ring.empty = empty;
  ring.unit_b1 = unit_b1;
  ring.unit_w2 = unit_w2;
  const int first = blockIdx.x * p.slices_per_cta;
  const int count = min(p.slices_per_cta, p.num_slices - first);
  const int passes = (count + p.box_slices - 1) / p.box_slices;
  const int k_chunks = static_cast<int>((p.d + Cfg::kBlockK - 1) / Cfg::kBlockK);
  if (threadIdx.x == 0) {
    for (uint32_t s = 0; s < ring.stages; ++s) {
      // The TMA byte count + every producer thread's row copies.
      barrier_init(&full[s], 1 + Cfg::kThreads - 32 * Cfg::kMathWarps);
      barrier_init(&empty[s], Cfg::kMathWarps);
    }
    barrier_init_fence();
    prefetch_tensor_map(&w1_map);
    // W1 is a weight, which the grids before this one do not write: L2 may fetch a ring's worth of
    // it before griddepcontrol.wait and the mask ranking, whose latency then overlaps the first DRAM
    // reads; this matters most at small batches, where that latency is a large share of the call. A
    // whole ring's worth is fetched: only the first stages gave back part of the gain.
    if (count > 0) {
      const int stages = min(static_cast<int>(ring.stages), k_chunks);
      for (int box = 0; box < stages * (Cfg::kBlockK / kBoxColumns); ++box)
        prefetch_box_l2(&w1_map, box * kBoxColumns, first * kSliceUnits);
    }
  }
  // (The barriers of the row selection publish the initialization to the other threads.)
  wait_for_prior_grids();
  const float b2 = p.fused_tail ? to_float(static_cast<const T*>(p.b2)[0]) : 0.f;
  uint32_t iteration = 0;
  int64_t steps = 0;
  for (int chunk = 0; chunk < p.num_chunks; ++chunk) {
    const int filled = select_chunk_rows<Cfg>(p, chunk, chunk == 0 && blockIdx.x == 0, chunk_rows, warp_counts, &steps);
    // Chunks fill in rank order: after an empty one, all later ones are empty too. With no step row
    // at all W1 is never read; every logit is 0.0, written by CTA 0 (fused tail) or the reduction.
    if (filled == 0) break;
    for (int pass = 0; pass < passes; ++pass) {
      const int slice0 = first + pass * p.box_slices;
      const int slices = min(p.box_slices, first + count - slice0);
      stream_item<T, Cfg>(p, &w1_map, ring, slice0, slices, chunk, filled, chunk_rows, iteration);
      iteration += static_cast<uint32_t>(k_chunks);
    }
  }
  if (!p.fused_tail) allow_next_grid();
  if (!p.fused_tail || steps == 0) return;
  // Every thread's partials are visible device-wide before this CTA's ticket.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) ticket = atomicInc(g_stream_tickets, gridDim.x - 1);
  __syncthreads();
  if (ticket != gridDim.x - 1) return;
  __threadfence();
  sum_step_logits<T, Cfg>(p, steps, b2, chunk_rows, reinterpret_cast<float*>(ring.base));
#else
  __trap();  // never launched: the launcher sees this code's PTX version is below 9.0
#endif
}

}  // namespace xbai
