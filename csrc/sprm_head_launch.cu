// Host side of the SPRM head kernels: picks the row-chunk width, sizes the persistent grid from the
// device, and enqueues the tile kernel and the reduction on the caller's stream.
#include <atomic>

#include "sprm_head.cuh"
#include "sprm_head_launch.h"

#ifndef XBAI_COMPILED_TARGETS
#define XBAI_COMPILED_TARGETS "unknown"
#endif

namespace {

constexpr int kMaxDevices = 64;
constexpr int64_t kWorkspaceAlign = 256;
constexpr int kReduceWarps = 8;

// Narrow chunks for small batches: a decode step of B rows never has more than B step rows, so
// B = 1 multiplies an 8-row tile instead of a 64-row one (less shared memory, more CTAs per SM).
int chunk_rows_for(int64_t num_rows) {
  if (num_rows <= 8) return 8;
  if (num_rows <= 16) return 16;
  if (num_rows <= 32) return 32;
  return 64;
}

struct Layout {
  int chunk_rows;
  int num_chunks;
  int num_tiles;
  int64_t row_capacity;
  int64_t partials_bytes;
  int64_t total_bytes;
};

Layout layout_for(int32_t source, int64_t num_rows, int64_t d) {
  Layout l;
  l.chunk_rows = chunk_rows_for(num_rows);
  l.num_chunks = static_cast<int>((num_rows + l.chunk_rows - 1) / l.chunk_rows);
  l.num_tiles = static_cast<int>((2 * d + xbai::kTileUnits - 1) / xbai::kTileUnits);
  l.row_capacity = static_cast<int64_t>(l.num_chunks) * l.chunk_rows;
  l.partials_bytes = (l.num_tiles * l.row_capacity * 4 + kWorkspaceAlign - 1) / kWorkspaceAlign * kWorkspaceAlign;
  l.total_bytes = l.partials_bytes + (source == XBAI_ROWS_MASKED ? num_rows * 4 : 0);
  if (l.total_bytes == 0) l.total_bytes = kWorkspaceAlign;
  return l;
}

// Tile configurations: TileConfig<chunk rows, BlockK, stages, warps along units>. Each keeps
// about 50-64 KB of W1 in flight per CTA (Little's law at HBM3 latency under load: ~40 KB per
// CTA for 160 CTAs to reach 4 TB/s) with two CTAs resident per SM (<= 113 KB of shared memory each).
// The "wide" family moves 128 columns per stage (fewer barriers per byte); "deep" moves 64 with
// more stages (finer-grained refill). Both give the same bits (see sprm_head.cuh).
using Wide8 = xbai::TileConfig<8, 128, 5, 4>;
using Wide16 = xbai::TileConfig<16, 128, 5, 4>;
using Wide32 = xbai::TileConfig<32, 128, 4, 2>;
using Wide64 = xbai::TileConfig<64, 64, 5, 2>;
using Deep8 = xbai::TileConfig<8, 64, 9, 4>;
using Deep16 = xbai::TileConfig<16, 64, 8, 4>;
using Deep32 = xbai::TileConfig<32, 64, 7, 2>;
using Deep64 = xbai::TileConfig<64, 128, 3, 2>;

// Per device: resident CTAs per SM times SMs, read once (the attribute calls are not stream work,
// so the cached value also serves launches under graph capture).
template <typename T, class Cfg>
cudaError_t persistent_grid(int* grid) {
  static std::atomic<int> cached[kMaxDevices];
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  if (device < kMaxDevices && cached[device].load() > 0) {
    *grid = cached[device].load();
    return cudaSuccess;
  }
  const size_t smem = Cfg::template smem_bytes<T>();
  auto kernel = xbai::head_tiles_kernel<T, Cfg>;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  int sms = 0, per_sm = 0;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, xbai::kThreads, smem);
  if (err != cudaSuccess) return err;
  *grid = sms * (per_sm > 0 ? per_sm : 1);
  if (device < kMaxDevices) cached[device].store(*grid);
  return cudaSuccess;
}

template <typename T, class Cfg>
cudaError_t launch(const xbai::HeadParams& p, cudaStream_t stream) {
  int grid = 0;
  cudaError_t err = persistent_grid<T, Cfg>(&grid);
  if (err != cudaSuccess) return err;
  const int items = p.num_tiles * p.num_chunks;
  if (grid > items) grid = items;
  xbai::head_tiles_kernel<T, Cfg><<<grid, xbai::kThreads, Cfg::template smem_bytes<T>(), stream>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int64_t reduce_blocks = (p.num_rows + kReduceWarps - 1) / kReduceWarps;
  xbai::head_reduce_kernel<T><<<static_cast<unsigned>(reduce_blocks), 32 * kReduceWarps, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_for_chunk(const xbai::HeadParams& p, int chunk_rows, int pipeline, cudaStream_t stream) {
  // H200, d = 5120 (benchmarks/NOTES.md): wide was faster at 8 and 16 rows (41 vs 46 us, 48 vs 51),
  // deep at 64 rows (78 vs 82 us); 32 rows was not timed and keeps wide.
  const bool deep = pipeline == XBAI_PIPELINE_DEEP || (pipeline == XBAI_PIPELINE_AUTO && chunk_rows == 64);
  switch (chunk_rows) {
    case 8: return deep ? launch<T, Deep8>(p, stream) : launch<T, Wide8>(p, stream);
    case 16: return deep ? launch<T, Deep16>(p, stream) : launch<T, Wide16>(p, stream);
    case 32: return deep ? launch<T, Deep32>(p, stream) : launch<T, Wide32>(p, stream);
    default: return deep ? launch<T, Deep64>(p, stream) : launch<T, Wide64>(p, stream);
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace

extern "C" int64_t xbai_head_workspace_bytes(int32_t source, int64_t num_rows, int64_t d) {
  return layout_for(source, num_rows, d).total_bytes;
}

extern "C" int32_t xbai_head_logits(const XbaiHeadLaunch* a) {
  if (a->dtype != XBAI_FLOAT16 && a->dtype != XBAI_BFLOAT16) return XBAI_BAD_DTYPE;
  if (a->d <= 0 || a->d % 8 != 0) return XBAI_BAD_HIDDEN_SIZE;
  if (a->pipeline != XBAI_PIPELINE_WIDE && a->pipeline != XBAI_PIPELINE_DEEP && a->pipeline != XBAI_PIPELINE_AUTO)
    return XBAI_BAD_PIPELINE;
  if (a->source != XBAI_ROWS_ALL && a->source != XBAI_ROWS_INDEXED && a->source != XBAI_ROWS_MASKED)
    return XBAI_BAD_ROW_SOURCE;
  if (a->num_rows <= 0) return XBAI_OK;
  if (!a->hidden || !a->w1 || !a->b1 || !a->w2 || !a->b2 || !a->out || !a->workspace ||
      (a->source == XBAI_ROWS_INDEXED && !a->row_index) || (a->source == XBAI_ROWS_MASKED && !a->row_mask))
    return XBAI_MISSING_POINTER;
  if (!aligned16(a->hidden) || !aligned16(a->w1) || a->hidden_stride % 8 != 0 ||
      (reinterpret_cast<uintptr_t>(a->workspace) % kWorkspaceAlign) != 0)
    return XBAI_MISALIGNED;
  const Layout l = layout_for(a->source, a->num_rows, a->d);
  if (a->workspace_bytes < l.total_bytes) return XBAI_WORKSPACE_TOO_SMALL;

  xbai::HeadParams p;
  p.hidden = a->hidden;
  p.hidden_rows = a->hidden_rows;
  p.hidden_stride = a->hidden_stride;
  p.d = a->d;
  p.source = a->source;
  p.row_index = a->row_index;
  p.row_mask = a->row_mask;
  p.num_rows = a->num_rows;
  p.w1 = a->w1;
  p.b1 = a->b1;
  p.w2 = a->w2;
  p.b2 = a->b2;
  p.partials = static_cast<float*>(a->workspace);
  p.output_slot = reinterpret_cast<int32_t*>(static_cast<char*>(a->workspace) + l.partials_bytes);
  p.out = a->out;
  p.row_capacity = l.row_capacity;
  p.num_tiles = l.num_tiles;
  p.num_chunks = l.num_chunks;

  cudaStream_t stream = static_cast<cudaStream_t>(a->stream);
  const cudaError_t err = a->dtype == XBAI_BFLOAT16
                              ? launch_for_chunk<__nv_bfloat16>(p, l.chunk_rows, a->pipeline, stream)
                              : launch_for_chunk<__half>(p, l.chunk_rows, a->pipeline, stream);
  return static_cast<int32_t>(err);
}

extern "C" const char* xbai_status_string(int32_t status) {
  switch (status) {
    case XBAI_OK: return "ok";
    case XBAI_BAD_DTYPE: return "dtype code must be 0 (float16) or 1 (bfloat16)";
    case XBAI_BAD_HIDDEN_SIZE: return "hidden size d must be a positive multiple of 8";
    case XBAI_MISALIGNED: return "hidden, w1 and the hidden row stride must be 16-byte aligned, the workspace 256-byte aligned";
    case XBAI_BAD_ROW_SOURCE: return "row source must be 0 (all), 1 (indexed) or 2 (masked)";
    case XBAI_WORKSPACE_TOO_SMALL: return "workspace is smaller than xbai_head_workspace_bytes()";
    case XBAI_MISSING_POINTER: return "a required pointer is null";
    case XBAI_BAD_PIPELINE: return "pipeline must be 0 (wide), 1 (deep) or 2 (auto)";
    default: return status > 0 ? cudaGetErrorString(static_cast<cudaError_t>(status)) : "unknown status";
  }
}

extern "C" const char* xbai_compiled_targets(void) { return XBAI_COMPILED_TARGETS; }
