// DecodeScorer's per-step bookkeeping (ops/reference.py: decode_candidates, decode_record) over raw
// device pointers: which rows open a step, and the append of each row's event to its slot.
//
// Both kernels touch only [B]-sized data plus one event slot per row: a few microseconds of device
// time. They exist in this module for the host side: called from Python, a launch here costs a few
// microseconds against tens for a JIT-compiled Triton launch, and a decode step runs three launches
// (candidates, head, record) after every sampled token.
#include <cuda_runtime.h>
#include <stdint.h>

#include "sprm_head_launch.h"

namespace {

constexpr int kThreads = 128;

__device__ __forceinline__ bool in_step_set(int64_t token, const bool* table, int64_t table_size) {
  // Ids outside the table (NO_TOKEN included) are not step tokens.
  return token >= 0 && token < table_size && table[token];
}

__global__ void candidates_kernel(XbaiDecodeCandidates a) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= a.batch) return;
  const int64_t current = a.last_token[a.slots[i]];
  // SPEC rules 1 and 2: the next token is a step token, the current one is neither a step token,
  // <think>, nor unknown.
  a.out[i] = in_step_set(a.sampled[i], a.step_table, a.table_size) &&
             !in_step_set(current, a.step_table, a.table_size) && current != a.think_start &&
             current != a.no_token;
}

__global__ void record_kernel(XbaiDecodeRecord a) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= a.batch) return;
  const int64_t slot = a.slots[i];
  const int64_t token = a.sampled[i];
  const bool step = a.is_step[i];
  const int64_t marker = token == a.think_start ? a.kind_think_start : (token == a.think_end ? a.kind_think_end : 0);
  const bool has_event = step || marker != 0;
  // A step is keyed by the position it scores, a marker by the position of the marker token.
  const int64_t position = step ? a.positions[i] : a.positions[i] + 1;
  const int64_t count = a.counts[slot];
  // Rows with nothing to record, and events past capacity, land in the trash column `capacity`.
  const int64_t column = has_event && count < a.capacity ? count : a.capacity;
  const int64_t flat = slot * (a.capacity + 1) + column;
  a.events[flat] = position * 4 + (step ? a.kind_step : marker);  // (position << 2) | kind
  a.event_logits[flat] = a.logits[i];
  a.counts[slot] = count + (has_event ? 1 : 0);
  a.last_token[slot] = token;
}

int32_t launch_status() {
  const cudaError_t error = cudaGetLastError();
  return error == cudaSuccess ? XBAI_OK : static_cast<int32_t>(error);
}

unsigned blocks(int64_t batch) { return static_cast<unsigned>((batch + kThreads - 1) / kThreads); }

}  // namespace

extern "C" int32_t xbai_decode_candidates(const XbaiDecodeCandidates* a) {
  if (a->batch <= 0) return XBAI_OK;
  if (!a->last_token || !a->sampled || !a->slots || !a->step_table || !a->out) return XBAI_MISSING_POINTER;
  candidates_kernel<<<blocks(a->batch), kThreads, 0, static_cast<cudaStream_t>(a->stream)>>>(*a);
  return launch_status();
}

extern "C" int32_t xbai_decode_record(const XbaiDecodeRecord* a) {
  if (a->batch <= 0) return XBAI_OK;
  if (!a->events || !a->event_logits || !a->counts || !a->last_token || !a->slots || !a->positions ||
      !a->sampled || !a->is_step || !a->logits)
    return XBAI_MISSING_POINTER;
  record_kernel<<<blocks(a->batch), kThreads, 0, static_cast<cudaStream_t>(a->stream)>>>(*a);
  return launch_status();
}
