// Host side of the SPRM head kernels: picks the row-chunk width and tile configuration, sizes the
// persistent grid from the device, and enqueues the item kernel and the reduction on the caller's stream.
#include <cudaTypedefs.h>

#include <atomic>
#include <type_traits>

#include "sprm_head.cuh"
#include "sprm_head_launch.h"
#include "sprm_head_stream.cuh"

#ifndef XBAI_COMPILED_TARGETS
#define XBAI_COMPILED_TARGETS "unknown"
#endif

namespace {

constexpr int kMaxDevices = 64;
constexpr int64_t kWorkspaceAlign = 256;
constexpr int kReduceWarps = 8;

// Narrow chunks for small batches: a decode step of B rows never has more than B step rows, so
// B = 1 multiplies an 8-row tile instead of a 64-row one (less shared memory, fewer wasted MMAs).
int chunk_rows_for(int64_t num_rows) {
  if (num_rows <= 8) return 8;
  if (num_rows <= 16) return 16;
  if (num_rows <= 32) return 32;
  return 64;
}

struct Layout {
  int chunk_rows;
  int num_chunks;
  int num_slices;
  int64_t row_capacity;
  int64_t partials_bytes;  // then, for the decode source, output_slot and step_row: int32 [num_rows] each
  int64_t total_bytes;
};

Layout layout_for(int32_t source, int64_t num_rows, int64_t d) {
  Layout l;
  l.chunk_rows = chunk_rows_for(num_rows);
  l.num_chunks = static_cast<int>((num_rows + l.chunk_rows - 1) / l.chunk_rows);
  l.num_slices = static_cast<int>((2 * d + xbai::kSliceUnits - 1) / xbai::kSliceUnits);
  l.row_capacity = static_cast<int64_t>(l.num_chunks) * l.chunk_rows;
  l.partials_bytes = (l.num_slices * l.row_capacity * 4 + kWorkspaceAlign - 1) / kWorkspaceAlign * kWorkspaceAlign;
  l.total_bytes = l.partials_bytes + (source == XBAI_ROWS_MASKED ? 2 * num_rows * 4 : 0);
  if (l.total_bytes == 0) l.total_bytes = kWorkspaceAlign;
  return l;
}

// Tile configurations: TileConfig<chunk rows, BlockK, stages, warps along rows>, one CTA per SM.
// "wide" reads 256 contiguous bytes of each W1 row per stage, 5-6 stages (up to 196 KB of shared
// memory: Hopper, A100); "deep" reads 128 bytes per row in at most 83 KB, so it also fits GPUs with
// 99 KB per block (sm_86/sm_89). Deep has twice the stages per byte, so twice the loop overhead of an
// issue-bound loop per byte: auto takes wide where it fits, after the sm_90 streaming kernel (below)
// where that applies. All give the same bits (sprm_head.cuh: the K split among warps and every sum
// order are fixed).
using Wide8 = xbai::TileConfig<8, 128, 6, 1>;
using Wide16 = xbai::TileConfig<16, 128, 6, 1>;
using Wide32 = xbai::TileConfig<32, 128, 5, 2>;
using Wide64 = xbai::TileConfig<64, 128, 5, 2>;
using Deep8 = xbai::TileConfig<8, 64, 6, 1>;
using Deep16 = xbai::TileConfig<16, 64, 6, 1>;
using Deep32 = xbai::TileConfig<32, 64, 5, 2>;
using Deep64 = xbai::TileConfig<64, 64, 4, 2>;
// Streaming-kernel configurations, xbai::StreamConfig<chunk rows, warps along rows, stage columns,
// copy warps, warpgroup MMA>. Up to 16 rows a stage is 256 columns (fewer, larger TMA boxes per
// byte of W1); at 32-64 rows it is 128 columns, because the rows' share of a stage grows with them
// and 36 KB stages already leave only 6 in the ring, the fewest that cover the latency. Four copy
// warps carry 64 rows' copies, and at 64 rows the two math warpgroups multiply by wgmma (no ldmatrix
// per fragment; the same bits as mma.sync).
using Stream8 = xbai::StreamConfig<8, 1, 256, 1>;
using Stream16 = xbai::StreamConfig<16, 1, 256, 1>;
using Stream32 = xbai::StreamConfig<32, 2, 128, 2>;
using Stream64 = xbai::StreamConfig<64, 2, 128, 4, true>;

struct DeviceInfo {
  int device;
  int sms;
  int max_smem;     // opt-in dynamic shared memory per block
  int dependent;    // programmatic dependent launch (sm_90+)
  int stream;       // the streaming kernel's sm_90 code is what this device loads
};

// Whether the device runs the streaming kernel's real body: the code the driver loaded for it must
// come from an sm_90+ target (on an sm_80 image, or PTX JIT-compiled from compute_80, it is a trap).
bool stream_kernel_loaded() {
  cudaFuncAttributes attributes;
  if (cudaFuncGetAttributes(&attributes, xbai::head_stream_kernel<__nv_bfloat16, Stream8>) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return attributes.ptxVersion >= 90;
}

// Read once per device (attribute queries are not stream work, so the cached values also serve
// launches under graph capture).
cudaError_t device_info(DeviceInfo* info) {
  static std::atomic<int> cached_sms[kMaxDevices], cached_smem[kMaxDevices], cached_major[kMaxDevices],
      cached_stream[kMaxDevices];
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  info->device = device;
  if (device < kMaxDevices && cached_sms[device].load() > 0) {
    info->sms = cached_sms[device].load();
    info->max_smem = cached_smem[device].load();
    info->dependent = cached_major[device].load() >= 9;
    info->stream = cached_stream[device].load();
    return cudaSuccess;
  }
  int sms = 0, smem = 0, major = 0;
  if ((err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device)) != cudaSuccess) return err;
  if ((err = cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device)) != cudaSuccess) return err;
  if ((err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device)) != cudaSuccess) return err;
  const int stream = major >= 9 && stream_kernel_loaded();
  if (device < kMaxDevices) {
    cached_smem[device].store(smem);
    cached_major[device].store(major);
    cached_stream[device].store(stream);
    cached_sms[device].store(sms);
  }
  info->sms = sms;
  info->max_smem = smem;
  info->dependent = major >= 9;
  info->stream = stream;
  return cudaSuccess;
}

// Raises the kernel's dynamic shared-memory limit, once per kernel and device.
template <auto Kernel>
cudaError_t prepare_kernel(size_t smem, int device) {
  static std::atomic<int> done[kMaxDevices];
  if (device < kMaxDevices && done[device].load()) return cudaSuccess;
  const cudaError_t err = cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(smem));
  if (err == cudaSuccess && device < kMaxDevices) done[device].store(1);
  return err;
}

// Launches `kernel` on `stream`, as a programmatic dependent launch where the GPU has it: the
// kernel may start while the previous grid on the stream finishes, and waits on
// griddepcontrol.wait before it reads anything (sprm_head.cuh).
template <typename Kernel, typename... Args>
cudaError_t launch_kernel(Kernel kernel, unsigned grid, unsigned threads, size_t smem, bool dependent,
                          cudaStream_t stream, const Args&... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(grid);
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  config.numAttrs = dependent ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, args...);
}

// The reduction: one warp per output row, after the item kernel.
template <typename T>
cudaError_t launch_reduce(const xbai::HeadParams& p, bool dependent, cudaStream_t stream) {
  const int64_t reduce_blocks = (p.num_rows + kReduceWarps - 1) / kReduceWarps;
  return launch_kernel(xbai::head_reduce_kernel<T>, static_cast<unsigned>(reduce_blocks), 32 * kReduceWarps, 0,
                       dependent, stream, p);
}

template <typename T, class Cfg>
cudaError_t launch(xbai::HeadParams p, const DeviceInfo& info, bool dependent, cudaStream_t stream) {
  constexpr auto kernel = xbai::head_items_kernel<T, Cfg>;
  cudaError_t err = prepare_kernel<kernel>(Cfg::template smem_bytes<T>(), info.device);
  if (err != cudaSuccess) return err;
  // Decode and single-chunk calls: the balanced schedule, one CTA per SM, each its share of the
  // slices. Many row chunks: the grouped schedule over 64-unit tiles.
  p.balanced = p.source == XBAI_ROWS_MASKED || p.num_chunks == 1;
  const int tiles = (p.num_slices + xbai::kTileSlices - 1) / xbai::kTileSlices;
  const int64_t work = p.balanced ? p.num_slices : static_cast<int64_t>(tiles) * p.num_chunks;
  const int grid = static_cast<int>(work < info.sms ? work : info.sms);
  err = launch_kernel(kernel, grid, Cfg::kThreads, Cfg::template smem_bytes<T>(), dependent, stream, p);
  if (err != cudaSuccess) return err;
  return launch_reduce<T>(p, dependent, stream);
}

// The cp.async kernel: wide where the GPU's shared memory holds it (or asked for), else deep.
template <typename T, class Wide, class Deep>
cudaError_t launch_family(const xbai::HeadParams& p, int pipeline, const DeviceInfo& info, bool dependent,
                          cudaStream_t stream) {
  const bool wide_fits = Wide::template smem_bytes<T>() <= static_cast<size_t>(info.max_smem);
  const bool deep = pipeline == XBAI_PIPELINE_DEEP || (pipeline != XBAI_PIPELINE_WIDE && !wide_fits);
  return deep ? launch<T, Deep>(p, info, dependent, stream) : launch<T, Wide>(p, info, dependent, stream);
}

// ---- The TMA streaming kernel (sm_90, sprm_head_stream.cuh) ----

// cuTensorMapEncodeTiled from the driver, found once through the runtime (the module links no libcuda).
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 encoder = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();
      return static_cast<PFN_cuTensorMapEncodeTiled_v12000>(nullptr);
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  return encoder;
}

// How the slices split over the grid: `passes` boxes of `box_slices` per CTA (box_slices <= kMaxSlices,
// the accumulators a thread holds), the fewest CTAs that cover the slices in one wave of `sms`.
struct StreamSplit {
  int slices_per_cta;
  int box_slices;
  int grid;
};

StreamSplit stream_split(int num_slices, int sms) {
  StreamSplit s;
  const int per_cta = (num_slices + sms - 1) / sms;
  const int passes = (per_cta + xbai::kMaxSlices - 1) / xbai::kMaxSlices;
  s.box_slices = (per_cta + passes - 1) / passes;
  s.slices_per_cta = passes * s.box_slices;
  s.grid = (num_slices + s.slices_per_cta - 1) / s.slices_per_cta;
  return s;
}

// Dynamic shared memory of a streaming kernel: all the device allows beside its static part (the
// kernel skips up to 1024 bytes of it to align the ring).
template <auto Kernel>
size_t stream_smem(const DeviceInfo& info) {
  static std::atomic<int> static_bytes{-1};
  if (static_bytes.load() < 0) {
    cudaFuncAttributes attributes;
    if (cudaFuncGetAttributes(&attributes, Kernel) != cudaSuccess) {
      (void)cudaGetLastError();
      return 0;
    }
    static_bytes.store(static_cast<int>(attributes.sharedSizeBytes));
  }
  return static_cast<size_t>(info.max_smem - static_bytes.load());
}

// Whether the streaming kernel serves the call: sm_90 code loaded, the driver's tensor-map encoder,
// d >= 64 (one TMA box wide), the decode source or one row chunk, hidden under 64 GB, and room for
// two stages and the epilogue's pre-activations.
template <typename T, class Cfg>
bool stream_applies(const xbai::HeadParams& p, const DeviceInfo& info) {
  if (!info.stream || p.d < 64 || !(p.source == XBAI_ROWS_MASKED || p.num_chunks == 1)) return false;
  // The producer holds row addresses as 32-bit counts of 16-byte pieces.
  if (p.hidden_rows * p.hidden_stride / 8 >= (int64_t{1} << 32)) return false;
  if (tensor_map_encoder() == nullptr) return false;
  const StreamSplit split = stream_split(p.num_slices, info.sms);
  const size_t stage = xbai::stream_stage_bytes<Cfg>(split.box_slices * xbai::kSliceUnits);
  const size_t smem = stream_smem<xbai::head_stream_kernel<T, Cfg>>(info);
  if (smem < 1024) return false;
  const size_t ring = smem - 1024;
  return 2 * stage <= ring && Cfg::reduce_bytes() <= ring;
}

template <typename T, class Cfg>
cudaError_t launch_stream(xbai::HeadParams p, const DeviceInfo& info, int tail, bool dependent, cudaStream_t stream) {
  constexpr auto kernel = xbai::head_stream_kernel<T, Cfg>;
  const size_t smem = stream_smem<kernel>(info);
  cudaError_t err = prepare_kernel<kernel>(smem, info.device);
  if (err != cudaSuccess) return err;
  const StreamSplit split = stream_split(p.num_slices, info.sms);
  p.balanced = 1;
  p.slices_per_cta = split.slices_per_cta;
  p.box_slices = split.box_slices;
  // One launch (the last CTA sums) for decode batches of up to 32 rows: one CTA's sum over every
  // step row beats a second launch only while there are few of them.
  p.fused_tail = p.source == XBAI_ROWS_MASKED &&
                 (tail == XBAI_TAIL_FUSED || (tail == XBAI_TAIL_AUTO && p.num_rows <= 32));
  // W1 as a [2d, d] tensor of box_slices * 16 rows x 64 columns boxes, 128-byte swizzled. No L2
  // promotion: W1 is read once per call, and promoting its sectors only displaced other data (the
  // stream measured slower with 256-byte promotion).
  CUtensorMap map;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(p.d), static_cast<cuuint64_t>(p.num_slices) * xbai::kSliceUnits};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(p.d) * sizeof(T)};
  const cuuint32_t box[2] = {xbai::kBoxColumns, static_cast<cuuint32_t>(split.box_slices * xbai::kSliceUnits)};
  const cuuint32_t element_strides[2] = {1, 1};
  const CUresult encoded = tensor_map_encoder()(
      &map, std::is_same<T, __nv_bfloat16>::value ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
      2, const_cast<void*>(p.w1), dims, strides, box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
      CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_NONE, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (encoded != CUDA_SUCCESS) return cudaErrorInvalidValue;
  err = launch_kernel(kernel, split.grid, Cfg::kThreads, smem, dependent, stream, p, map);
  if (err != cudaSuccess || p.fused_tail) return err;
  // The reduction under PDL, let in by each CTA only once its items are done: its CTAs then take
  // the SMs as they free and wait there for the partials. (Let in at this kernel's start, its CTAs
  // would take SMs the items still need.)
  return launch_reduce<T>(p, dependent, stream);
}

// One chunk width: the streaming kernel where it is asked for (auto, stream) and applies, else the
// cp.async family.
template <typename T, class Stream, class Wide, class Deep>
cudaError_t launch_chunk(const xbai::HeadParams& p, int pipeline, int tail, const DeviceInfo& info, bool dependent,
                         cudaStream_t stream) {
  const bool stream_asked = pipeline == XBAI_PIPELINE_AUTO || pipeline == XBAI_PIPELINE_STREAM;
  if (stream_asked && stream_applies<T, Stream>(p, info)) return launch_stream<T, Stream>(p, info, tail, dependent, stream);
  return launch_family<T, Wide, Deep>(p, pipeline, info, dependent, stream);
}

template <typename T>
cudaError_t launch_for_chunk(const xbai::HeadParams& p, int chunk_rows, int pipeline, int tail, bool dependent,
                             cudaStream_t stream) {
  DeviceInfo info;
  const cudaError_t err = device_info(&info);
  if (err != cudaSuccess) return err;
  dependent = dependent && info.dependent;
  switch (chunk_rows) {
    case 8: return launch_chunk<T, Stream8, Wide8, Deep8>(p, pipeline, tail, info, dependent, stream);
    case 16: return launch_chunk<T, Stream16, Wide16, Deep16>(p, pipeline, tail, info, dependent, stream);
    case 32: return launch_chunk<T, Stream32, Wide32, Deep32>(p, pipeline, tail, info, dependent, stream);
    default: return launch_chunk<T, Stream64, Wide64, Deep64>(p, pipeline, tail, info, dependent, stream);
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
  if (a->pipeline < XBAI_PIPELINE_WIDE || a->pipeline > XBAI_PIPELINE_STREAM) return XBAI_BAD_PIPELINE;
  if (a->tail < XBAI_TAIL_AUTO || a->tail > XBAI_TAIL_KERNEL) return XBAI_BAD_TAIL;
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
  p.step_row = p.output_slot + a->num_rows;
  p.out = a->out;
  p.row_capacity = l.row_capacity;
  p.num_slices = l.num_slices;
  p.num_chunks = l.num_chunks;
  p.balanced = 0;
  p.slices_per_cta = 0;
  p.box_slices = 0;
  p.fused_tail = 0;

  cudaStream_t stream = static_cast<cudaStream_t>(a->stream);
  const cudaError_t err = a->dtype == XBAI_BFLOAT16
                              ? launch_for_chunk<__nv_bfloat16>(p, l.chunk_rows, a->pipeline, a->tail, a->dependent_launch != 0, stream)
                              : launch_for_chunk<__half>(p, l.chunk_rows, a->pipeline, a->tail, a->dependent_launch != 0, stream);
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
    case XBAI_BAD_PIPELINE: return "pipeline must be 0 (wide), 1 (deep), 2 (auto) or 3 (stream)";
    case XBAI_BAD_TAIL: return "tail must be 0 (auto), 1 (fused) or 2 (kernel)";
    default: return status > 0 ? cudaGetErrorString(static_cast<cudaError_t>(status)) : "unknown status";
  }
}

extern "C" const char* xbai_compiled_targets(void) { return XBAI_COMPILED_TARGETS; }
