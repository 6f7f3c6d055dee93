"""SPRMHead: the step-scoring MLP, and its checkpoints (released ``score_module.pt`` and our safetensors)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
from torch import nn

from ._validate import FLOAT_DTYPES, check_tensor
from .ops import dispatch

RELEASED_FILENAME = "score_module.pt"
SAFETENSORS_FILENAME = "sprm_head.safetensors"
HEAD_KEYS = ("0.weight", "0.bias", "3.weight", "3.bias")
# The released head's dropout, between the ReLU and W2, active in training only.
DROPOUT_P = 0.5
_FORMAT = "xbai-sprm-head"


class CheckpointError(ValueError):
    """A head checkpoint is missing, unreadable, unsafe or does not fit the model."""


class SPRMHead(nn.Sequential):
    """logit = W2 relu(W1 h + b1) + b2, with W1 [2d, d], b1 [2d], W2 [1, 2d], b2 [1].

    Laid out as the released ``nn.Sequential(Linear, ReLU, Dropout, Linear)``, so its ``state_dict``
    keys are ``0.weight``, ``0.bias``, ``3.weight``, ``3.bias`` and released checkpoints load as they
    are. ``forward(h[..., d])`` returns float32 logits ``[...]`` (fp32 accumulation whatever the
    weights' dtype); in training mode the dropout is active.
    """

    def __init__(self, hidden_size: int, device=None, dtype=None) -> None:
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size <= 0:
            raise ValueError(f"SPRMHead: hidden_size must be a positive int, got {hidden_size!r}")
        factory = {"device": device, "dtype": dtype}
        super().__init__(
            nn.Linear(hidden_size, 2 * hidden_size, **factory),
            nn.ReLU(),
            nn.Dropout(DROPOUT_P),
            nn.Linear(2 * hidden_size, 1, **factory),
        )
        self.hidden_size = hidden_size

    @property
    def weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(W1, b1, W2, b2), the tensors every backend op takes."""
        # By name, not self[0]: Sequential's indexing walks its modules, and the decode scorer reads
        # the weights after every token.
        first, last = self._modules["0"], self._modules["3"]
        return first.weight, first.bias, last.weight, last.bias

    def scoring_inputs(self) -> dispatch.HeadInputs:
        """How scoring calls look to the backend router: hidden states in the head's own dtype, no
        autograd (the decode scorer and the vLLM recorders pick their ops once with this)."""
        return dispatch.HeadInputs(self._modules["0"].weight.dtype, self.hidden_size, grad=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        w1 = self[0].weight
        check_tensor("SPRMHead", "hidden", hidden, dtypes=FLOAT_DTYPES, device=w1.device)
        if hidden.dim() == 0 or hidden.shape[-1] != self.hidden_size:
            raise ValueError(
                f"SPRMHead: hidden must end in the hidden size {self.hidden_size}, got shape {tuple(hidden.shape)}"
            )
        lead = hidden.shape[:-1]
        rows = hidden.reshape(-1, self.hidden_size)
        if self.training and torch.is_grad_enabled():
            activation = self[2](torch.relu(nn.functional.linear(rows.float(), w1.float(), self[0].bias.float())))
            logits = nn.functional.linear(activation, self[3].weight.float(), self[3].bias.float()).squeeze(-1)
        else:
            logits = dispatch.call("head_logits", rows.device, rows, *self.weights)
        return logits.reshape(lead)

    # ----- checkpoints -------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        hidden_size: int | None = None,
        device=None,
        dtype: torch.dtype | None = None,
    ) -> "SPRMHead":
        """Load a head from a model directory (``sprm_head.safetensors`` or ``score_module.pt``) or a file.

        ``hidden_size``, when given, must match the checkpoint (the backbone's hidden size). ``dtype``
        defaults to the checkpoint's own.
        """
        state = load_state_dict(path)
        d = validate_state_dict(state, hidden_size, source=str(path))
        head = cls(d, device="meta")
        head.load_state_dict(state, assign=True)
        return head.to(device=device, dtype=dtype or state["0.weight"].dtype)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``sprm_head.safetensors`` (hidden size in its metadata) into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        return self.save_file(directory / SAFETENSORS_FILENAME)

    def save_file(self, path: str | os.PathLike) -> Path:
        """Write the head to the safetensors file ``path`` (hidden size in its metadata)."""
        from safetensors.torch import save

        target = Path(path)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        data = save(state, metadata={"format": _FORMAT, "hidden_size": str(self.hidden_size)})
        target.write_bytes(_sorted_metadata(data))
        return target


def _sorted_metadata(data: bytes) -> bytes:
    """The same safetensors file with its metadata keys sorted.

    safetensors keeps the metadata in a hash map, so their order, and with it the file's bytes,
    changes from run to run; sorted, the same head always gives the same file.
    """
    import json

    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > length:  # cannot happen for a reordering; keep the original rather than break it
        return data
    # Same length as before: the header's trailing space padding keeps the tensor data aligned.
    return data[:8] + text.ljust(length) + data[8 + length :]


def find_checkpoint(path: str | os.PathLike) -> Path:
    """The head file for ``path``: the path itself if a file, else the one a model directory holds."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        for name in (SAFETENSORS_FILENAME, RELEASED_FILENAME):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"no SPRM head in {path}: expected {SAFETENSORS_FILENAME} or {RELEASED_FILENAME}")
    raise CheckpointError(f"SPRM head checkpoint {path} does not exist")


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a head checkpoint safely: safetensors, or a ``.pt`` pickle restricted to tensors."""
    file = find_checkpoint(path)
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            # load_file's tensors are views into one buffer at the file's offsets (8-byte aligned): each
            # gets its own allocation, so the weights compute the same bits as when loaded from a .pt
            # (CPU BLAS kernels take alignment-dependent paths) and hold no more memory than they need.
            state = {key: tensor.clone() for key, tensor in load_file(str(file)).items()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{file} is not a readable safetensors file ({exc})") from exc
    else:
        try:
            # A .pt file is a pickle, which can run code: anything but tensors and plain containers is refused.
            state = torch.load(file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(
                f"{file} is not a plain tensor checkpoint: it is corrupt, or it asks to unpickle something "
                f"other than tensors, which is refused ({_unpickler_finding(exc)})"
            ) from None  # torch's own message ends in advice to load unrestricted, which we never give
        except (RuntimeError, EOFError, OSError, ValueError) as exc:
            raise CheckpointError(f"{file} is not a readable torch checkpoint (truncated or corrupt?): {exc}") from exc
        if not isinstance(state, dict):
            raise CheckpointError(f"{file} holds a {type(state).__name__}, expected a state dict")
    return state


def _unpickler_finding(exc: Exception) -> str:
    """What torch's restricted unpickler objected to, without its advice to retry unrestricted."""
    _, found, detail = str(exc).partition("WeightsUnpickler error:")
    lines = [line.strip() for line in (detail if found else str(exc)).splitlines() if line.strip()]
    return lines[0].split(" Please use")[0] if lines else type(exc).__name__


def validate_state_dict(state: dict, hidden_size: int | None = None, source: str = "state dict") -> int:
    """Check keys, shapes and dtypes of a head state dict; return its hidden size d."""
    keys = set(state)
    missing = [k for k in HEAD_KEYS if k not in keys]
    unexpected = sorted(keys - set(HEAD_KEYS))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: SPRM head keys do not match the released layout {list(HEAD_KEYS)}: "
            f"missing {missing}, unexpected {unexpected}"
        )
    for key in HEAD_KEYS:
        tensor = state[key]
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{source}: {key} is a {type(tensor).__name__}, expected a tensor")
        if tensor.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{source}: {key} has dtype {tensor.dtype}, expected float32, float16 or bfloat16")
    w1 = state["0.weight"]
    if w1.dim() != 2 or w1.shape[0] != 2 * w1.shape[1]:
        raise CheckpointError(f"{source}: 0.weight has shape {tuple(w1.shape)}, expected [2d, d]")
    d = int(w1.shape[1])
    expected = {"0.bias": (2 * d,), "3.weight": (1, 2 * d), "3.bias": (1,)}
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise CheckpointError(f"{source}: {key} has shape {tuple(state[key].shape)}, expected {shape} for d={d}")
    if hidden_size is not None and d != hidden_size:
        raise CheckpointError(f"{source}: the head has hidden size {d} but the model's hidden size is {hidden_size}")
    return d


def model_hidden_size(directory: str | os.PathLike) -> int | None:
    """The backbone's hidden size from a HuggingFace model directory's ``config.json`` (None without one)."""
    import json

    config_file = Path(directory) / "config.json"
    if not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{config_file} is not readable JSON ({exc})") from exc
    # Multimodal configs nest the language model's sizes under text_config.
    size = config.get("hidden_size", config.get("text_config", {}).get("hidden_size"))
    if not isinstance(size, int):
        raise CheckpointError(f"{config_file} names no integer hidden_size")
    return size


def check_model_directory(directory: str | os.PathLike) -> tuple[Path, int]:
    """Check that ``directory`` is a HuggingFace model directory whose SPRM head fits its backbone.

    Returns (the head file, the hidden size). Raises ``CheckpointError`` with a one-line reason: the
    directory is missing, has no ``config.json``, has no head, or the head's size differs from the model's.
    Reads only the head and the config, so it is cheap enough to run before loading the model.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"model directory {directory} does not exist" if not directory.exists()
                              else f"{directory} is a file, expected a model directory")
    hidden_size = model_hidden_size(directory)
    if hidden_size is None:
        raise CheckpointError(f"{directory} holds no config.json: it is not a HuggingFace model directory")
    head_file = find_checkpoint(directory)
    validate_state_dict(load_state_dict(head_file), hidden_size, source=str(head_file))
    return head_file, hidden_size


# Output names that say "a file in another format": convert writes safetensors only.
_NOT_SAFETENSORS = (".pt", ".pth", ".bin", ".ckpt", ".pkl")


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, hidden_size: int | None = None) -> Path:
    """Validate a head checkpoint and write it as safetensors; return the file written.

    ``src`` is a released ``score_module.pt``, any head checkpoint, or a model directory (then the
    head must fit the hidden size in its ``config.json``). ``hidden_size``, when given, must match too.
    ``dst`` is a directory (gets ``sprm_head.safetensors``) or a ``.safetensors`` file path; a path
    naming another file format, or an existing file of another kind, is refused.
    """
    src, dst = Path(src), Path(dst)
    if src.is_dir():
        _, model_size = check_model_directory(src)
        if hidden_size is not None and hidden_size != model_size:
            raise CheckpointError(f"{src}: the model's hidden size is {model_size}, not {hidden_size}")
        hidden_size = model_size
    if dst.suffix != ".safetensors":
        if dst.suffix.lower() in _NOT_SAFETENSORS or dst.is_file():
            raise CheckpointError(
                f"{dst}: convert writes safetensors; give a directory (it gets {SAFETENSORS_FILENAME}) "
                f"or a path ending in .safetensors"
            )
    head = SPRMHead.from_pretrained(src, hidden_size=hidden_size)
    if dst.suffix == ".safetensors":
        dst.parent.mkdir(parents=True, exist_ok=True)
        return head.save_file(dst)
    return head.save_pretrained(dst)
