"""SPRM training inside HuggingFace causal LMs (Qwen2, Qwen3, Llama), patched from the outside.

``apply_sprm(model)`` makes the model capture ``h`` (the hidden state entering the LAST
decoder layer, HuggingFace's ``output_hidden_states[-2]``) while it runs, without
``output_hidden_states``, and gives it an SPRM head. A forward call that receives
``sprm_rewards`` then also returns the SPR loss (docs/semantics.md)::

    out = model(input_ids, attention_mask=mask, sprm_rewards=rewards, sprm_response_mask=response)
    (out.loss + out.sprm_loss).backward()      # out.sprm_stats: counts, logits, monitoring numbers

Layouts: a padded batch ``[B, T]`` with ``sprm_rewards`` [B]; or packed sequences in one row
``[1, T]`` (verl's "remove padding" layout) with ``sprm_rewards`` [S] and either ``position_ids``
restarting per sequence or ``sprm_cu_seqlens`` (int32 [S+1]; flash-attention's ``cu_seq_lens_q``
is read too). The loss is ``xbai_kernels.training.sequence_spr_loss`` on the flattened tokens.

The patch is driven by ``_PATCH_TABLE``: every entry replaces one attribute of one module, the
original is kept, ``apply_sprm`` returns the records of what it replaced and ``revert_sprm``
puts back exactly those originals (or removes an attribute that was not there before).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import operator
import os
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from . import semantics
from ._validate import FLOAT_DTYPES, INDEX_DTYPES, check_cu_seqlens, check_tensor
from .head import SPRMHead
from .rule import StepRule
from .training import BACKBONE_GRAD_SCALE, next_token_step_mask, sequence_spr_loss

# model_type -> where the decoder layers live. The three families share HF's Llama layout.
DECODER_LAYERS = {
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "llama": "model.layers",
}
HEAD_ATTRIBUTE = "sprm_head"
STATE_ATTRIBUTE = "_xbai_sprm"
# Keyword arguments the patched forward takes off before calling the model's own forward.
SPRM_KWARGS = ("sprm_rewards", "sprm_response_mask", "sprm_cu_seqlens")


class _Absent:
    """Marks an attribute that the module's instance did not have before the patch."""

    def __repr__(self) -> str:
        return "<absent>"


ABSENT = _Absent()


@dataclass
class SPRMState:
    """What the patched model carries: the training rule and the ``h`` captured during one forward."""

    step_token_id: int | None
    process_group: object
    backbone_grad_scale: float
    capturing: bool = False
    hidden: torch.Tensor | None = None
    patches: tuple = field(default_factory=tuple)


@dataclass(frozen=True)
class AppliedPatch:
    """One replaced attribute: ``target.attribute`` was ``original`` (``ABSENT``: not set) and is now ``replacement``."""

    name: str
    target: nn.Module
    attribute: str
    original: object
    replacement: object


class _CaptureLayerInput:
    """Replaces the last decoder layer's ``forward``: while the patched model forward runs, keeps its
    input hidden states (the tensor itself, already alive as the layer's input: no copy). Gradient
    checkpointing recomputes the layer during backward; ``capturing`` is off then, so nothing is kept."""

    def __init__(self, original: Callable, state: SPRMState) -> None:
        self.original = original
        self.state = state

    def __call__(self, *args, **kwargs):
        if self.state.capturing:
            self.state.hidden = args[0] if args else kwargs["hidden_states"]
        return self.original(*args, **kwargs)


class _SPRMForward:
    """Replaces the causal LM's ``forward``: takes the ``sprm_*`` keyword arguments off, runs the
    original forward with ``h`` captured, and adds ``sprm_loss`` / ``sprm_stats`` to its output."""

    def __init__(self, original: Callable, state: SPRMState, model: nn.Module) -> None:
        self.original = original
        self.state = state
        self.model = model
        # The model class's own parameter names, even when ``original`` is a generic wrapper
        # (accelerate's hooks install ``forward(*args, **kwargs)`` on the instance).
        signature = inspect.signature(type(model).forward)
        signature = signature.replace(parameters=list(signature.parameters.values())[1:])
        self._bind = signature.bind_partial
        extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None) for name in SPRM_KWARGS]
        params = list(signature.parameters.values())
        tail = [p for p in params if p.kind == inspect.Parameter.VAR_KEYWORD]
        head = [p for p in params if p.kind != inspect.Parameter.VAR_KEYWORD]
        # Trainer keeps only the dataset columns the forward's signature names: name ours there.
        self.__signature__ = signature.replace(parameters=head + extra + tail)

    def __call__(self, *args, **kwargs):
        rewards = kwargs.pop("sprm_rewards", None)
        response_mask = kwargs.pop("sprm_response_mask", None)
        cu_seqlens = kwargs.pop("sprm_cu_seqlens", None)
        if rewards is None:
            if response_mask is not None or cu_seqlens is not None:
                raise ValueError("apply_sprm: sprm_response_mask / sprm_cu_seqlens were given without sprm_rewards")
            return self.original(*args, **kwargs)
        if kwargs.get("return_dict") is False:
            raise ValueError("apply_sprm: the SPR loss is returned on the output object; call with return_dict=True")
        if self.state.step_token_id is None:
            raise ValueError(
                "apply_sprm: no step token is known; pass rule=StepRule.from_tokenizer(tokenizer) "
                "(or the id of '.\\n\\n') to apply_sprm"
            )
        # A training forward needs no KV cache, and with one HuggingFace stops reading packed
        # sequences from position_ids (attention would cross them).
        kwargs.setdefault("use_cache", False)
        arguments = self._bind(*args, **kwargs).arguments
        extra = arguments.get("kwargs", {})
        input_ids = arguments.get("input_ids")
        if input_ids is None:
            raise ValueError("apply_sprm: sprm_rewards needs input_ids (the training positions follow the tokens)")
        if cu_seqlens is None:
            cu_seqlens = extra.get("cu_seq_lens_q")

        state = self.state
        if state.capturing:
            raise RuntimeError("apply_sprm: the patched forward was entered again while it was running")
        state.capturing, state.hidden = True, None
        try:
            outputs = self.original(*args, **kwargs)
            hidden = state.hidden
        finally:
            state.capturing, state.hidden = False, None
        if hidden is None:
            raise RuntimeError("apply_sprm: the last decoder layer did not run, so h was not captured")

        loss, stats = training_loss(
            hidden,
            input_ids,
            rewards,
            getattr(self.model, HEAD_ATTRIBUTE),
            state,
            attention_mask=arguments.get("attention_mask"),
            position_ids=arguments.get("position_ids"),
            response_mask=response_mask,
            cu_seqlens=cu_seqlens,
        )
        return _with_sprm_fields(type(outputs))(**outputs, sprm_loss=loss, sprm_stats=stats)


@functools.cache
def _with_sprm_fields(output_class: type) -> type:
    """``output_class`` (a HuggingFace ``ModelOutput`` dataclass) with ``sprm_loss`` and ``sprm_stats``.

    A real subclass, not two keys added to the instance: DistributedDataParallel rebuilds its output
    through the constructor, which must know every field.
    """
    return dataclasses.make_dataclass(
        f"SPRM{output_class.__name__}",
        [("sprm_loss", "torch.Tensor | None", None), ("sprm_stats", "dict | None", None)],
        bases=(output_class,),
        namespace={"__module__": __name__},
    )


def training_loss(
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    rewards: torch.Tensor,
    head: SPRMHead,
    state: SPRMState,
    *,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    response_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SPR loss of one forward: hidden [B, T, d] (captured ``h``), input_ids [B, T].

    Padded (``rewards`` [B]): sequences are the rows, padding (0 in a 2-D ``attention_mask``) is
    never trained. Packed (one row, ``rewards`` [S] with S > 1, or ``cu_seqlens`` given): sequences
    come from ``cu_seqlens`` or from ``position_ids`` (a new sequence wherever the position does not
    go up by one, HuggingFace's own packed-sequence rule). ``response_mask`` [B, T] defaults to all
    tokens. Returns (loss, stats) of ``sequence_spr_loss`` with ``logits`` reshaped to [B, T] and
    ``step_score_geomean`` per sequence.
    """
    where = "apply_sprm"
    check_tensor(where, "input_ids", input_ids, ndim=2, dtypes=INDEX_DTYPES)
    batch, length = input_ids.shape
    device = hidden.device
    if hidden.dim() != 3 or tuple(hidden.shape[:2]) != (batch, length):
        raise ValueError(f"{where}: captured h has shape {tuple(hidden.shape)}, input_ids {tuple(input_ids.shape)}")
    if not isinstance(rewards, torch.Tensor):
        rewards = torch.as_tensor(rewards, dtype=torch.float32, device=device)
    check_tensor(where, "sprm_rewards", rewards, ndim=1, dtypes=FLOAT_DTYPES + (torch.float64,), device=device)
    if response_mask is not None:
        check_tensor(where, "sprm_response_mask", response_mask, ndim=2, device=device)
        if response_mask.shape != input_ids.shape:
            raise ValueError(
                f"{where}: sprm_response_mask has shape {tuple(response_mask.shape)}, input_ids {tuple(input_ids.shape)}"
            )

    packed = cu_seqlens is not None or (batch == 1 and rewards.shape[0] > 1)
    if packed:
        sequence_index = _packed_sequence_index(where, batch, length, rewards.shape[0], position_ids, cu_seqlens, device)
        same_sequence_as_next = torch.nn.functional.pad(sequence_index[1:] == sequence_index[:-1], (0, 1), value=False)
        sequence_index, same_sequence_as_next = sequence_index[None], same_sequence_as_next[None]
    else:
        if rewards.shape[0] != batch:
            raise ValueError(
                f"{where}: sprm_rewards has {rewards.shape[0]} entries for a batch of {batch} rows "
                "(packed sequences in one row need position_ids restarting per sequence or sprm_cu_seqlens)"
            )
        sequence_index = torch.arange(batch, device=device)[:, None].expand(batch, length)
        same_sequence_as_next = torch.ones((batch, length), dtype=torch.bool, device=device)
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        real = attention_mask.bool()
        # Neither the trained position nor its next token may be padding.
        same_sequence_as_next = same_sequence_as_next & real & torch.nn.functional.pad(real[:, 1:], (0, 1), value=False)

    step_mask = next_token_step_mask(input_ids, state.step_token_id, response_mask, same_sequence_as_next)
    loss, stats = sequence_spr_loss(
        hidden.reshape(batch * length, hidden.shape[-1]),
        step_mask.reshape(-1),
        sequence_index.reshape(-1),
        rewards,
        head,
        backbone_grad_scale=state.backbone_grad_scale,
        process_group=state.process_group,
    )
    stats["logits"] = stats["logits"].reshape(batch, length)
    return loss, stats


def _packed_sequence_index(where, batch, length, num_rewards, position_ids, cu_seqlens, device) -> torch.Tensor:
    """int64 [T]: the sequence of each token of a packed row (checked against the number of rewards)."""
    if batch != 1:
        raise ValueError(f"{where}: packed sequences must be one row [1, T], got {batch} rows")
    if cu_seqlens is not None:
        check_cu_seqlens(where, cu_seqlens, length, device)
        num_sequences = cu_seqlens.numel() - 1
        sequence_index = semantics.sequence_index(cu_seqlens, length)
    elif isinstance(position_ids, torch.Tensor) and position_ids.dim() == 2 and position_ids.shape == (1, length):
        positions = position_ids[0]
        starts = torch.nn.functional.pad(positions[1:] - positions[:-1] != 1, (1, 0), value=False)
        sequence_index = torch.cumsum(starts.long(), dim=0)
        num_sequences = int(sequence_index[-1]) + 1 if length else 0
    else:
        raise ValueError(
            f"{where}: {num_rewards} rewards for one row: packed sequences need position_ids [1, {length}] "
            "restarting per sequence, or sprm_cu_seqlens"
        )
    if num_sequences != num_rewards:
        raise ValueError(f"{where}: the packed row holds {num_sequences} sequences but sprm_rewards has {num_rewards}")
    return sequence_index


# ----- the patch table ---------------------------------------------------------------------------


def _the_model(model: nn.Module) -> nn.Module:
    return model


def _last_decoder_layer(model: nn.Module) -> nn.Module:
    layers = operator.attrgetter(DECODER_LAYERS[model.config.model_type])(model)
    # HF runs layers[: num_hidden_layers]; h is the input of the last one that runs.
    return layers[model.config.num_hidden_layers - 1]


@dataclass(frozen=True)
class _PatchSpec:
    name: str
    locate: Callable[[nn.Module], nn.Module]
    attribute: str
    # (model, the attribute's current value, state, head) -> the replacement
    build: Callable[[nn.Module, object, SPRMState, SPRMHead], object]


_PATCH_TABLE = (
    _PatchSpec("state", _the_model, STATE_ATTRIBUTE, lambda model, current, state, head: state),
    # A registered submodule: it moves with .to(), trains with model.parameters(), is wrapped by DDP.
    _PatchSpec("head", _the_model, HEAD_ATTRIBUTE, lambda model, current, state, head: head),
    _PatchSpec(
        "capture h",
        _last_decoder_layer,
        "forward",
        lambda model, current, state, head: _CaptureLayerInput(current, state),
    ),
    _PatchSpec(
        "forward",
        _the_model,
        "forward",
        lambda model, current, state, head: _SPRMForward(current, state, model),
    ),
)


def _instance_value(target: nn.Module, attribute: str):
    """The attribute as set on the instance itself (``ABSENT`` if it only comes from the class)."""
    for store in (target.__dict__, target.__dict__.get("_modules", {}), target.__dict__.get("_parameters", {})):
        if attribute in store:
            return store[attribute]
    return ABSENT


def apply_sprm(
    model: nn.Module,
    head: SPRMHead | str | os.PathLike | None = None,
    rule: StepRule | int | None = None,
    *,
    process_group="auto",
    backbone_grad_scale: float = BACKBONE_GRAD_SCALE,
) -> tuple[AppliedPatch, ...]:
    """Patch a HuggingFace Qwen2/Qwen3/Llama causal LM in place for SPRM training.

    ``head``: an ``SPRMHead``, a path for ``SPRMHead.from_pretrained`` (``sprm_head.safetensors`` or
    the released ``score_module.pt``), or ``None`` for a new random head (float32, on the model's
    device). It becomes the submodule ``model.sprm_head``. ``rule``: a ``StepRule`` (its
    ``step_token_id``, the first id of ``".\\n\\n"``, is the training step id) or that id as an int.
    ``process_group``: where the positive/negative counts are summed (``"auto"``: the default group
    when torch.distributed is initialized). Returns the applied patches (with the originals).
    """
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"apply_sprm: expected a HuggingFace PreTrainedModel, got {type(model).__name__}")
    model_type = getattr(model.config, "model_type", None)
    if model_type not in DECODER_LAYERS:
        raise ValueError(
            f"apply_sprm: model_type {model_type!r} is not supported; supported: {', '.join(sorted(DECODER_LAYERS))}"
        )
    if STATE_ATTRIBUTE in model.__dict__:
        raise RuntimeError("apply_sprm: the model is already patched; call revert_sprm(model) first")
    hidden_size = int(model.config.hidden_size)
    head = _resolve_head(head, hidden_size, model.get_input_embeddings().weight.device)
    if not 0.0 <= backbone_grad_scale <= 1.0:
        raise ValueError(f"apply_sprm: backbone_grad_scale must be in [0, 1], got {backbone_grad_scale}")
    state = SPRMState(_step_token_id(rule), process_group, float(backbone_grad_scale))

    applied = []
    try:
        for spec in _PATCH_TABLE:
            target = spec.locate(model)
            original = _instance_value(target, spec.attribute)
            replacement = spec.build(model, getattr(target, spec.attribute, None), state, head)
            setattr(target, spec.attribute, replacement)
            applied.append(AppliedPatch(spec.name, target, spec.attribute, original, replacement))
    except BaseException:
        _undo(applied)
        raise
    state.patches = tuple(applied)
    return state.patches


def revert_sprm(model: nn.Module) -> tuple[AppliedPatch, ...]:
    """Undo ``apply_sprm``: every patched attribute gets its original back (or is removed when the
    instance had none), in reverse order. Returns the patches that were undone."""
    state = model.__dict__.get(STATE_ATTRIBUTE)
    if not isinstance(state, SPRMState):
        raise ValueError("revert_sprm: the model is not patched by apply_sprm")
    for patch in state.patches:
        if _instance_value(patch.target, patch.attribute) is not patch.replacement:
            raise RuntimeError(
                f"revert_sprm: {type(patch.target).__name__}.{patch.attribute} was replaced again after "
                "apply_sprm; refusing to undo someone else's patch"
            )
    _undo(list(state.patches))
    return state.patches


def is_patched(model: nn.Module) -> bool:
    """True when every patch of ``apply_sprm`` is in place on ``model``."""
    state = model.__dict__.get(STATE_ATTRIBUTE)
    if not isinstance(state, SPRMState) or len(state.patches) != len(_PATCH_TABLE):
        return False
    return all(_instance_value(p.target, p.attribute) is p.replacement for p in state.patches)


def _undo(applied: list[AppliedPatch]) -> None:
    for patch in reversed(applied):
        if patch.original is ABSENT:
            delattr(patch.target, patch.attribute)
        else:
            setattr(patch.target, patch.attribute, patch.original)


def _resolve_head(head, hidden_size: int, device: torch.device) -> SPRMHead:
    if head is None:
        return SPRMHead(hidden_size, device=device, dtype=torch.float32)
    if isinstance(head, (str, os.PathLike)):
        return SPRMHead.from_pretrained(head, hidden_size=hidden_size, device=device)
    if not isinstance(head, SPRMHead):
        raise TypeError(f"apply_sprm: head must be an SPRMHead, a checkpoint path or None, got {type(head).__name__}")
    if head.hidden_size != hidden_size:
        raise ValueError(f"apply_sprm: the head has hidden size {head.hidden_size}, the model {hidden_size}")
    return head


def _step_token_id(rule) -> int | None:
    if rule is None:
        return None
    if isinstance(rule, StepRule):
        return rule.step_token_id
    if isinstance(rule, bool) or not isinstance(rule, int) or rule < 0:
        raise TypeError(f"apply_sprm: rule must be a StepRule, a non-negative token id or None, got {rule!r}")
    return rule
