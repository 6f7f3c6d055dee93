"""CUDA backend: ``torch.library`` custom ops over the compiled, torch-free module ``xbai_kernels._C``.

``_C`` (csrc/, built by CMakeLists.txt) takes raw device pointers, sizes, a dtype code and a CUDA
stream; it links neither torch nor libpython, so the same file runs under any torch release. This
module turns tensors into those arguments, registers the ops with fake (meta) implementations so
``torch.compile`` and CUDA-graph capture see them, and runs each launch on the current torch stream.

Ops of the backend contract (``ops/reference.py``):
    head_logits(hidden [N, d], w1, b1, w2, b2) -> float32 [N]
    head_logits_rows(hidden [T, d], rows int [n], w1, b1, w2, b2, num_rows=None) -> float32 [n]
    step_mask, find_steps, trajectory_scores: the reference's PyTorch ops (no kernel of their own)
    head_logits_masked(hidden [B, d], row_mask bool [B], w1, b1, w2, b2, out=None) -> float32 [B]
    decode_candidates(last_token, sampled, slots, step_table, think_start_id) -> bool [B]
    decode_record(events, event_logits, counts, last_token, slots, positions, sampled, is_step, logits,
                  think_start_id, think_end_id) -> None (in place)

The tensor-core kernels take fp16/bf16 ``hidden`` with every weight in the same dtype, d a multiple
of 8, and no autograd; ``refuses`` tells the router (``ops.dispatch``) so, and other inputs reaching
these functions are an error. A row index outside ``hidden`` gives NaN instead of an error, because
checking would need a host synchronization.

How the kernels launch is settled once, when this module loads, from three variables that exist for
measurement (the defaults are the fastest measured); ``launch_settings`` changes them for a block.
``XBAI_KERNELS_CUDA_PIPELINE=wide|deep|stream|auto`` picks how W1 streams (csrc/sprm_head_launch.cu);
all give the same bits. ``wide``/``deep``: per-thread 16-byte cp.async copies, 256 or 128 contiguous
bytes of each W1 row per stage, any GPU from sm_80. ``stream``: sm_90, W1 by TMA boxes and the scored
rows copied beside it into an mbarrier ring, for the decode scorer and calls of one chunk of up to 64
rows (d >= 64); elsewhere it falls back to ``auto``'s cp.async choice. ``auto`` (the default) takes
``stream`` where it applies, else ``wide`` where the GPU's shared memory holds it (Hopper, A100), else
``deep``. ``XBAI_KERNELS_CUDA_TAIL=auto|fused|kernel`` picks who adds the streaming kernel's slices
for the decode scorer: its last CTA (one launch; ``auto`` up to 32 rows) or a second kernel; the
fused tail keeps one int32 ticket per device, so calls on one device must not overlap in time (one
stream, as decode engines run it). ``XBAI_KERNELS_CUDA_PDL=0`` turns off programmatic dependent
launch (on by default; sm_90+ only), which lets each kernel's launch overlap the end of the kernel
before it on the stream.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from dataclasses import dataclass

import torch
from torch.utils import _python_dispatch

from xbai_kernels import _validate
from xbai_kernels.ops import dispatch, reference

try:
    from xbai_kernels import _C
except ImportError as exc:  # built without nvcc, or XBAI_KERNELS_BUILD_CUDA=0
    _C = None
    _IMPORT_ERROR: str | None = str(exc)
else:
    _IMPORT_ERROR = None

BUILD_HINT = "built without CUDA: reinstall with XBAI_KERNELS_BUILD_CUDA=1 and nvcc on PATH"
# sm_80 is the oldest target compiled in (mma.sync bf16, cp.async); newer GPUs run its PTX or sm_90a.
MIN_CAPABILITY = (8, 0)
KERNEL_DTYPES = (torch.float16, torch.bfloat16)
# Source codes of csrc/sprm_head_launch.h (XbaiRowSource): which rows the kernel scores.
ROWS_ALL, ROWS_INDEXED, ROWS_MASKED = 0, 1, 2
_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1}
_PIPELINES = {"wide": 0, "deep": 1, "auto": 2, "stream": 3}
DEFAULT_PIPELINE = "auto"
_TAILS = {"auto": 0, "fused": 1, "kernel": 2}


def _env_choice(variable: str, choices, default: str) -> str:
    """The value of ``variable``, lowercased (unset or empty: ``default``); an error names the choices."""
    name = os.environ.get(variable, default).strip().lower() or default
    if name not in choices:
        raise ValueError(f"{variable}={name!r} is not one of {', '.join(choices)}")
    return name


@dataclass(frozen=True)
class LaunchSettings:
    """How the head kernels launch; every choice gives the same bits.

    pipeline: how W1 streams (wide, deep, stream, auto). tail: who sums the decode logits' slices
    (``fused``, the streaming kernel's last CTA; ``kernel``, a second launch; ``auto``, fused up to
    32 rows). dependent_launch: programmatic dependent launch on sm_90+.
    """

    pipeline: str = DEFAULT_PIPELINE
    tail: str = "auto"
    dependent_launch: bool = True

    def __post_init__(self):
        if self.pipeline not in _PIPELINES:
            raise ValueError(f"pipeline={self.pipeline!r} is not one of {', '.join(_PIPELINES)}")
        if self.tail not in _TAILS:
            raise ValueError(f"tail={self.tail!r} is not one of {', '.join(_TAILS)}")

    @classmethod
    def from_env(cls) -> "LaunchSettings":
        """``XBAI_KERNELS_CUDA_PIPELINE``, ``_TAIL`` and ``_PDL`` (0 or 1); an error names a bad value."""
        pdl = os.environ.get("XBAI_KERNELS_CUDA_PDL", "1").strip()
        if pdl not in ("0", "1"):
            raise ValueError(f"XBAI_KERNELS_CUDA_PDL={pdl!r} must be 0 or 1")
        return cls(
            _env_choice("XBAI_KERNELS_CUDA_PIPELINE", _PIPELINES, DEFAULT_PIPELINE),
            _env_choice("XBAI_KERNELS_CUDA_TAIL", _TAILS, "auto"),
            pdl == "1",
        )

    @property
    def codes(self) -> tuple[int, int, int]:
        """(pipeline, dependent launch, tail) as ``_C.head_logits`` takes them."""
        return _PIPELINES[self.pipeline], int(self.dependent_launch), _TAILS[self.tail]


_settings = LaunchSettings.from_env()
_launch_codes = _settings.codes


def current_launch_settings() -> LaunchSettings:
    return _settings


@contextlib.contextmanager
def launch_settings(**changes):
    """Launch with some ``LaunchSettings`` fields changed inside the block (benchmarks, tests)."""
    global _settings, _launch_codes
    saved = _settings
    _settings = dataclasses.replace(saved, **changes)
    _launch_codes = _settings.codes
    try:
        yield _settings
    finally:
        _settings, _launch_codes = saved, saved.codes


def unavailable_reason() -> str | None:
    """None when the compiled kernels can run on the current CUDA device, else why not."""
    if _C is None:
        return f"xbai_kernels._C is missing ({BUILD_HINT}; import said: {_IMPORT_ERROR})"
    if not hasattr(_C, "decode_record"):
        return f"xbai_kernels._C at {_C.__file__} predates this package's sources: rebuild it ({BUILD_HINT})"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    capability = torch.cuda.get_device_capability()
    if capability < MIN_CAPABILITY:
        return f"the CUDA kernels need compute capability >= 8.0, the device has {capability[0]}.{capability[1]}"
    return None


def compiled_targets() -> str | None:
    """The GPU targets inside ``_C`` (e.g. ``"sm_80 compute_80 sm_90a"``), None without ``_C``."""
    return None if _C is None else _C.compiled_targets()


def refuses(op: str, inputs) -> str | None:
    """Why the head kernels cannot take a call with these ``dispatch.HeadInputs``, or None (the router
    asks before it picks this backend; the other ops take whatever their checks accept)."""
    if inputs.dtype is None:
        return "head weights whose dtype differs from hidden's"
    if inputs.dtype not in KERNEL_DTYPES:
        return f"{str(inputs.dtype).removeprefix('torch.')} inputs (the CUDA kernels take float16/bfloat16)"
    if inputs.hidden_size % 8 != 0:
        return f"hidden size {inputs.hidden_size}, not a multiple of 8 (the CUDA kernels read 16-byte rows)"
    if inputs.grad:
        return "inputs that require grad (the CUDA kernels have no backward)"
    return None


def _check_kernel_inputs(where: str, hidden: torch.Tensor, weights: tuple[torch.Tensor, ...]) -> None:
    """The backend runs or raises: inputs the router would have sent elsewhere are an error here."""
    reason = refuses(where, dispatch.head_inputs(hidden, weights))
    if reason is not None:
        raise ValueError(f"{where}: the cuda backend cannot run {reason}; the automatic backend choice routes such calls")


def _check_head(where: str, hidden: torch.Tensor, w1, b1, w2, b2) -> None:
    _validate.check_tensor(where, "hidden", hidden, ndim=2, dtypes=_validate.FLOAT_DTYPES)
    _validate.check_head_weights(where, hidden, w1, b1, w2, b2)
    if hidden.device.type != "cuda":
        raise ValueError(f"{where}: the cuda backend needs CUDA tensors, hidden is on {hidden.device}")


def _row_aligned(hidden: torch.Tensor) -> torch.Tensor:
    """``hidden`` itself when the kernel can read it in place (unit last stride, 16-byte rows), else a copy."""
    if hidden.stride(1) == 1 and hidden.stride(0) % 8 == 0 and hidden.data_ptr() % 16 == 0:
        return hidden
    return hidden.contiguous()


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _device_scope(device: torch.device):
    """_C launches on the thread's current device: make it ``device`` (a context switch costs
    microseconds, so only when needed)."""
    return contextlib.nullcontext() if device.index == torch.cuda.current_device() else torch.cuda.device(device)


def _launch(source: int, hidden, rows, row_mask, w1, b1, w2, b2, out: torch.Tensor) -> None:
    """Enqueue the head on the current stream of hidden's device; writes ``out`` (float32 [n])."""
    num_rows = out.numel()
    if num_rows == 0:
        return
    hidden = _row_aligned(hidden)
    w1 = w1.contiguous()
    b1, w2, b2 = b1.contiguous(), w2.contiguous(), b2.contiguous()
    d = hidden.shape[1]
    # Scratch for the kernels' partial sums, from torch's caching allocator: stream-ordered, so calls
    # in flight never share it, and taken from a graph's own pool while a CUDA graph captures.
    workspace = torch.empty(_C.workspace_bytes(source, num_rows, d), dtype=torch.uint8, device=hidden.device)
    arguments = (
        hidden.data_ptr(), hidden.shape[0], hidden.stride(0), d, source,
        rows.data_ptr() if rows is not None else 0,
        row_mask.data_ptr() if row_mask is not None else 0,
        num_rows,
        w1.data_ptr(), b1.data_ptr(), w2.data_ptr(), b2.data_ptr(),
        out.data_ptr(), workspace.data_ptr(), workspace.numel(),
        _DTYPE_CODES[hidden.dtype], *_launch_codes, _stream(hidden.device),
    )
    with _device_scope(hidden.device):
        _C.head_logits(*arguments)


# The registered ops take already-checked inputs; the public functions below check and route.
def _all_rows(
    hidden: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor
) -> torch.Tensor:
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    _launch(ROWS_ALL, hidden, None, None, w1, b1, w2, b2, out)
    return out


def _indexed_rows(
    hidden: torch.Tensor, rows: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor
) -> torch.Tensor:
    out = torch.empty(rows.shape[0], dtype=torch.float32, device=hidden.device)
    _launch(ROWS_INDEXED, hidden, rows.contiguous(), None, w1, b1, w2, b2, out)
    return out


def _masked_rows(
    hidden: torch.Tensor, row_mask: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
    b2: torch.Tensor,
) -> torch.Tensor:
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    _launch(ROWS_MASKED, hidden, None, row_mask.contiguous(), w1, b1, w2, b2, out)
    return out


def _masked_rows_out(
    hidden: torch.Tensor, row_mask: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
    b2: torch.Tensor, out: torch.Tensor,
) -> None:
    _launch(ROWS_MASKED, hidden, None, row_mask.contiguous(), w1, b1, w2, b2, out)


# CUDA only: a CPU tensor reaching a registered op directly gets the dispatcher's error, never a
# host pointer handed to a kernel.
_cuda_op = functools.partial(torch.library.custom_op, device_types="cuda")
_head_logits_op = _cuda_op("xbai_kernels::cuda_head_logits", mutates_args=())(_all_rows)
_head_logits_rows_op = _cuda_op("xbai_kernels::cuda_head_logits_rows", mutates_args=())(_indexed_rows)
_head_logits_masked_op = _cuda_op("xbai_kernels::cuda_head_logits_masked", mutates_args=())(_masked_rows)
_head_logits_masked_out_op = _cuda_op("xbai_kernels::cuda_head_logits_masked_out", mutates_args=("out",))(
    _masked_rows_out
)
_EAGER = {
    _head_logits_op: _all_rows,
    _head_logits_rows_op: _indexed_rows,
    _head_logits_masked_op: _masked_rows,
    _head_logits_masked_out_op: _masked_rows_out,
}


@_head_logits_op.register_fake
def _(hidden, w1, b1, w2, b2):
    return hidden.new_empty(hidden.shape[0], dtype=torch.float32)


@_head_logits_rows_op.register_fake
def _(hidden, rows, w1, b1, w2, b2):
    return hidden.new_empty(rows.shape[0], dtype=torch.float32)


@_head_logits_masked_op.register_fake
def _(hidden, row_mask, w1, b1, w2, b2):
    return hidden.new_empty(hidden.shape[0], dtype=torch.float32)


@_head_logits_masked_out_op.register_fake
def _(hidden, row_mask, w1, b1, w2, b2, out):
    return None


def _op(custom_op, hidden: torch.Tensor):
    """The registered op whenever something traces (torch.compile, export, a dispatch mode, fake
    tensors: they need its fake implementation), else its plain function, so that eager calls skip
    the dispatcher. A CUDA graph captures the same two kernels either way."""
    tracing = (
        torch.compiler.is_compiling()
        or type(hidden) is not torch.Tensor
        or _python_dispatch._get_current_dispatch_mode() is not None
    )
    return custom_op if tracing else _EAGER[custom_op]


def head_logits(hidden: torch.Tensor, w1, b1, w2, b2) -> torch.Tensor:
    """logit of every row. hidden [N, d] -> float32 [N]."""
    _check_head("head_logits", hidden, w1, b1, w2, b2)
    _check_kernel_inputs("head_logits", hidden, (w1, b1, w2, b2))
    return _op(_head_logits_op, hidden)(hidden, w1, b1, w2, b2)


def head_logits_rows(hidden: torch.Tensor, rows: torch.Tensor, w1, b1, w2, b2, num_rows=None) -> torch.Tensor:
    """Head over hidden[rows]. hidden [T, d], rows int32/int64 [n] -> float32 [n] (packed scorer).

    ``num_rows`` (int tensor of one element): rows past it are padding with logit 0.0; this kernel
    computes them anyway and masks them.
    """
    _check_head("head_logits_rows", hidden, w1, b1, w2, b2)
    _validate.check_tensor("head_logits_rows", "rows", rows, ndim=1, dtypes=_validate.INDEX_DTYPES, device=hidden.device)
    if num_rows is not None:
        _validate.check_row_count("head_logits_rows", num_rows, hidden.device)
    _check_kernel_inputs("head_logits_rows", hidden, (w1, b1, w2, b2))
    logits = _op(_head_logits_rows_op, hidden)(hidden, rows.long(), w1, b1, w2, b2)
    return logits if num_rows is None else reference.zero_past(logits, num_rows)


# The packed scorer's bookkeeping has no kernel here: it runs as PyTorch ops on the GPU, so a forced
# ``cuda`` backend still scores trajectories.
step_mask = reference.step_mask
find_steps = reference.find_steps
trajectory_scores = reference.trajectory_scores


def head_logits_masked(
    hidden: torch.Tensor, row_mask: torch.Tensor, w1, b1, w2, b2, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Head over the rows where ``row_mask`` is set, 0.0 elsewhere (decode scorer).

    hidden [B, d], row_mask bool [B] -> float32 [B], written into ``out`` (float32 [B], contiguous)
    when given. The kernel decides on the device which rows to compute: no host synchronization,
    and rows that are not steps cost no head work.
    """
    where = "head_logits_masked"
    _check_head(where, hidden, w1, b1, w2, b2)
    _validate.check_tensor(where, "row_mask", row_mask, ndim=1, dtypes=(torch.bool,), device=hidden.device)
    if row_mask.shape[0] != hidden.shape[0]:
        raise ValueError(f"{where}: row_mask has {row_mask.shape[0]} rows, hidden has {hidden.shape[0]}")
    if out is not None:
        _validate.check_tensor(where, "out", out, ndim=1, dtypes=(torch.float32,), device=hidden.device)
        if out.shape[0] != hidden.shape[0] or not out.is_contiguous():
            raise ValueError(f"{where}: out must be a contiguous float32 [{hidden.shape[0]}], got {tuple(out.shape)}")
    _check_kernel_inputs(where, hidden, (w1, b1, w2, b2))
    if out is None:
        return _op(_head_logits_masked_op, hidden)(hidden, row_mask, w1, b1, w2, b2)
    _op(_head_logits_masked_out_op, hidden)(hidden, row_mask, w1, b1, w2, b2, out)
    return out


# ----- DecodeScorer's per-step bookkeeping ------------------------------------------------------------
# Tiny kernels; what they save is host time: a launch through _C costs a few microseconds from Python,
# a Triton launch tens, and the decode scorer makes three launches after every sampled token.


def _check_step_rows(where: str, sampled, **others) -> tuple[torch.device, int]:
    """(device, B) of a decode step whose per-row tensors are ``sampled`` and ``others``: int64 (the
    kernels read 8-byte ids), contiguous [B], on a CUDA device."""
    _validate.check_tensor(where, "sampled", sampled, ndim=1, dtypes=(torch.int64,))
    device, batch = sampled.device, sampled.shape[0]
    if device.type != "cuda":
        raise ValueError(f"{where}: the cuda backend needs CUDA tensors, sampled is on {device}")
    _validate.check_rows(where, device, batch, (torch.int64,), sampled=sampled, **others)
    return device, batch


def _check_slot_state(where: str, device: torch.device, **tensors) -> None:
    for name, (tensor, dtype, ndim) in tensors.items():
        _validate.check_tensor(where, name, tensor, ndim=ndim, dtypes=(dtype,), device=device)
        if not tensor.is_contiguous():
            raise ValueError(f"{where}: {name} must be contiguous (it is updated in place)")


def _candidates(
    last_token: torch.Tensor, sampled: torch.Tensor, slots: torch.Tensor, step_table: torch.Tensor, think_start_id: int
) -> torch.Tensor:
    out = torch.empty(sampled.shape[0], dtype=torch.bool, device=sampled.device)
    if out.numel():
        with _device_scope(sampled.device):
            _C.decode_candidates(
                last_token.data_ptr(), sampled.data_ptr(), slots.data_ptr(), step_table.data_ptr(), step_table.numel(),
                out.numel(), think_start_id, reference.NO_TOKEN, out.data_ptr(), _stream(sampled.device),
            )
    return out


def _record(
    events: torch.Tensor, event_logits: torch.Tensor, counts: torch.Tensor, last_token: torch.Tensor,
    slots: torch.Tensor, positions: torch.Tensor, sampled: torch.Tensor, is_step: torch.Tensor, logits: torch.Tensor,
    think_start_id: int, think_end_id: int,
) -> None:
    if sampled.numel():
        with _device_scope(sampled.device):
            _C.decode_record(
                events.data_ptr(), event_logits.data_ptr(), counts.data_ptr(), last_token.data_ptr(),
                slots.data_ptr(), positions.data_ptr(), sampled.data_ptr(), is_step.data_ptr(), logits.data_ptr(),
                sampled.numel(), events.shape[1] - 1, think_start_id, think_end_id,
                reference.EVENT_STEP, reference.EVENT_THINK_START, reference.EVENT_THINK_END, _stream(sampled.device),
            )


_decode_candidates_op = _cuda_op("xbai_kernels::cuda_decode_candidates", mutates_args=())(_candidates)
_decode_record_op = _cuda_op(
    "xbai_kernels::cuda_decode_record", mutates_args=("events", "event_logits", "counts", "last_token")
)(_record)
_EAGER[_decode_candidates_op] = _candidates
_EAGER[_decode_record_op] = _record


@_decode_candidates_op.register_fake
def _(last_token, sampled, slots, step_table, think_start_id):
    return sampled.new_empty(sampled.shape[0], dtype=torch.bool)


@_decode_record_op.register_fake
def _(events, event_logits, counts, last_token, slots, positions, sampled, is_step, logits, think_start_id, think_end_id):
    return None


def decode_candidates(
    last_token: torch.Tensor, sampled: torch.Tensor, slots: torch.Tensor, step_table: torch.Tensor, think_start_id: int
) -> torch.Tensor:
    """CUDA ``ops.reference.decode_candidates``: bool [B], no host sync. Index tensors int64, contiguous."""
    where = "decode_candidates"
    device, _ = _check_step_rows(where, sampled, slots=slots)
    _check_slot_state(where, device, last_token=(last_token, torch.int64, 1), step_table=(step_table, torch.bool, 1))
    return _op(_decode_candidates_op, sampled)(last_token, sampled, slots, step_table, int(think_start_id))


def decode_record(
    events: torch.Tensor, event_logits: torch.Tensor, counts: torch.Tensor, last_token: torch.Tensor,
    slots: torch.Tensor, positions: torch.Tensor, sampled: torch.Tensor, is_step: torch.Tensor, logits: torch.Tensor,
    think_start_id: int, think_end_id: int,
) -> None:
    """CUDA ``ops.reference.decode_record``: one launch, in place, no host sync; slots must be distinct."""
    where = "decode_record"
    device, batch = _check_step_rows(where, sampled, slots=slots, positions=positions)
    _check_slot_state(
        where, device, events=(events, torch.int64, 2), event_logits=(event_logits, torch.float32, 2),
        counts=(counts, torch.int64, 1), last_token=(last_token, torch.int64, 1),
        is_step=(is_step, torch.bool, 1), logits=(logits, torch.float32, 1),
    )
    if is_step.shape[0] != batch or logits.shape[0] != batch:
        raise ValueError(f"{where}: is_step and logits must have {batch} entries, got {is_step.shape[0]}, {logits.shape[0]}")
    if event_logits.shape != events.shape:
        raise ValueError(f"{where}: event_logits {tuple(event_logits.shape)} must match events {tuple(events.shape)}")
    _op(_decode_record_op, sampled)(
        events, event_logits, counts, last_token, slots, positions, sampled, is_step, logits,
        int(think_start_id), int(think_end_id),
    )
