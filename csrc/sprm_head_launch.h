/* C interface of the SPRM head kernels: raw device pointers, sizes, a dtype code and a CUDA stream.
 *
 * Plain C types only, so this boundary is stable across compilers, Python versions and torch
 * releases; the Python module (module.cpp) is a thin layer over it.
 */
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum XbaiDtype { XBAI_FLOAT16 = 0, XBAI_BFLOAT16 = 1 };

/* Which rows are scored (see sprm_head.cuh): all rows, rows by index, or rows under a mask. */
enum XbaiRowSource { XBAI_ROWS_ALL = 0, XBAI_ROWS_INDEXED = 1, XBAI_ROWS_MASKED = 2 };

/* Argument errors; any positive code is a cudaError_t. */
enum XbaiStatus {
  XBAI_OK = 0,
  XBAI_BAD_DTYPE = -1,
  XBAI_BAD_HIDDEN_SIZE = -2,   /* d must be a positive multiple of 8 (16-byte rows) */
  XBAI_MISALIGNED = -3,        /* hidden, w1 and the row stride must be 16-byte aligned */
  XBAI_BAD_ROW_SOURCE = -4,
  XBAI_WORKSPACE_TOO_SMALL = -5,
  XBAI_MISSING_POINTER = -6,
  XBAI_BAD_PIPELINE = -7,
  XBAI_BAD_TAIL = -8,
};

/* Shape of the W1 pipeline (sprm_head_launch.cu): same results, different speed and shared memory.
 * WIDE and DEEP: per-thread 16-byte cp.async copies (256 or 128 bytes of each W1 row per stage), any
 * GPU from sm_80. STREAM: sm_90, W1 by TMA boxes and the rows copied beside it, for the decode source
 * and calls of one chunk of up to 64 rows, d >= 64; elsewhere it falls back to AUTO's cp.async
 * choice. AUTO takes STREAM where it applies, else WIDE where the GPU's shared memory holds it, else
 * DEEP. */
enum XbaiPipeline { XBAI_PIPELINE_WIDE = 0, XBAI_PIPELINE_DEEP = 1, XBAI_PIPELINE_AUTO = 2, XBAI_PIPELINE_STREAM = 3 };

/* Who adds the slices of the STREAM kernel's decode logits: AUTO (the last CTA of the kernel up to
 * 32 rows, a second kernel above), FUSED (the last CTA), KERNEL (a second kernel). Same bits. */
enum XbaiTail { XBAI_TAIL_AUTO = 0, XBAI_TAIL_FUSED = 1, XBAI_TAIL_KERNEL = 2 };

typedef struct XbaiHeadLaunch {
  const void* hidden;       /* [hidden_rows, d], row stride hidden_stride elements */
  int64_t hidden_rows;
  int64_t hidden_stride;
  int64_t d;
  int32_t source;           /* XbaiRowSource */
  const int64_t* row_index; /* XBAI_ROWS_INDEXED: [num_rows] */
  const bool* row_mask;     /* XBAI_ROWS_MASKED: [num_rows], one byte per row */
  int64_t num_rows;         /* outputs */
  const void* w1;           /* [2d, d] */
  const void* b1;           /* [2d] */
  const void* w2;           /* [2d] */
  const void* b2;           /* [1] */
  float* out;               /* float32 [num_rows], written */
  void* workspace;          /* xbai_head_workspace_bytes(...) bytes, 256-byte aligned, scratch */
  int64_t workspace_bytes;
  int32_t dtype;            /* XbaiDtype of hidden and of every weight */
  int32_t pipeline;         /* XbaiPipeline */
  int32_t dependent_launch; /* 1: programmatic dependent launch on sm_90+ (ignored elsewhere), 0: plain */
  int32_t tail;             /* XbaiTail */
  void* stream;             /* cudaStream_t; the launch is asynchronous on it */
} XbaiHeadLaunch;

/* Scratch bytes a launch with these sizes needs (partial sums per 16-unit slice and row). */
int64_t xbai_head_workspace_bytes(int32_t source, int64_t num_rows, int64_t d);

/* Enqueues the head on launch->stream: out = W2 relu(W1 h + b1) + b2 per scored row. No host
 * synchronization, no allocation: safe inside CUDA-graph capture once a first call has run. */
int32_t xbai_head_logits(const XbaiHeadLaunch* launch);

/* DecodeScorer's bookkeeping (decode_record.cu; semantics: ops/reference.py). Index tensors are
 * int64 and contiguous, [batch] unless stated; kinds are the reference's EVENT_* codes. */
typedef struct XbaiDecodeCandidates {
  const int64_t* last_token; /* [num_slots]: each slot's token at the position being decoded */
  const int64_t* sampled;    /* the token sampled after it */
  const int64_t* slots;
  const bool* step_table;    /* [table_size]: whether a token id is a step token */
  int64_t table_size;
  int64_t batch;
  int64_t think_start;       /* <think>'s id */
  int64_t no_token;          /* the id of an unknown token */
  bool* out;                 /* written: whether the row's position opens a step */
  void* stream;
} XbaiDecodeCandidates;

typedef struct XbaiDecodeRecord {
  int64_t* events;           /* [num_slots, capacity + 1], (position << 2) | kind, updated */
  float* event_logits;       /* [num_slots, capacity + 1], updated */
  int64_t* counts;           /* [num_slots], updated */
  int64_t* last_token;       /* [num_slots], updated */
  const int64_t* slots;      /* distinct */
  const int64_t* positions;
  const int64_t* sampled;
  const bool* is_step;
  const float* logits;
  int64_t batch;
  int64_t capacity;
  int64_t think_start, think_end;
  int64_t kind_step, kind_think_start, kind_think_end;
  void* stream;
} XbaiDecodeRecord;

/* Enqueue one decode step's candidate test / event append on the stream; no host synchronization. */
int32_t xbai_decode_candidates(const XbaiDecodeCandidates* launch);
int32_t xbai_decode_record(const XbaiDecodeRecord* launch);

/* A readable message for a status code. */
const char* xbai_status_string(int32_t status);

/* The -gencode targets this file was built for, e.g. "sm_80 compute_80 sm_90a". */
const char* xbai_compiled_targets(void);

#ifdef __cplusplus
}
#endif
