"""SPRMHead: the forward formula, and its checkpoints (released .pt, our safetensors) with every way they go wrong."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from xbai_kernels import SPRMHead
from xbai_kernels.head import (
    HEAD_KEYS,
    RELEASED_FILENAME,
    SAFETENSORS_FILENAME,
    CheckpointError,
    convert_checkpoint,
    load_state_dict,
    validate_state_dict,
)


def _released_state(d: int, dtype=torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    """What the released trainer saves: the state dict of nn.Sequential(Linear, ReLU, Dropout, Linear)."""
    torch.manual_seed(seed)
    sequential = torch.nn.Sequential(
        torch.nn.Linear(d, 2 * d), torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(2 * d, 1)
    )
    return {k: v.to(dtype) for k, v in sequential.state_dict().items()}


def _formula(hidden: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
    """logit = W2 relu(W1 h + b1) + b2, in float64 as the yardstick."""
    w1, b1, w2, b2 = (state[k].double() for k in HEAD_KEYS)
    return (torch.relu(hidden.double() @ w1.T + b1) @ w2.T + b2).squeeze(-1)


# ----- the module ------------------------------------------------------------------------------


def test_state_dict_keys_are_the_released_ones():
    head = SPRMHead(16)
    assert tuple(head.state_dict()) == HEAD_KEYS
    assert head.hidden_size == 16
    assert [tuple(t.shape) for t in head.weights] == [(32, 16), (32,), (1, 32), (1,)]
    head.load_state_dict(_released_state(16))  # strict: the released layout loads unchanged


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_forward_matches_formula_with_float32_output(dtype):
    state = _released_state(24, dtype)
    head = SPRMHead(24, dtype=dtype)
    head.load_state_dict(state)
    head.eval()
    hidden = torch.randn(3, 5, 24).to(dtype)
    logits = head(hidden)
    assert logits.dtype == torch.float32 and logits.shape == (3, 5)
    expected = _formula(hidden, state).float()
    # fp32 accumulation: only the inputs' own rounding remains.
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    head = SPRMHead(32)
    hidden = torch.randn(64, 32)
    head.eval()
    assert torch.equal(head(hidden), head(hidden))
    head.train()
    first, second = head(hidden), head(hidden)
    assert not torch.equal(first, second)  # p = 0.5 dropout between the ReLU and W2
    assert first.dtype == torch.float32 and first.shape == (64,)


@pytest.mark.parametrize("bad", [0, -3, 2.0, True, "64"])
def test_bad_hidden_size(bad):
    with pytest.raises(ValueError, match="hidden_size must be a positive int"):
        SPRMHead(bad)


# ----- checkpoints: the good path ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_released_pt_to_safetensors_to_head(tmp_path, dtype):
    state = _released_state(40, dtype)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    torch.save(state, model_dir / RELEASED_FILENAME)

    from_pt = SPRMHead.from_pretrained(model_dir)
    assert from_pt.hidden_size == 40 and from_pt[0].weight.dtype == dtype

    written = convert_checkpoint(model_dir / RELEASED_FILENAME, tmp_path / "converted")
    assert written == tmp_path / "converted" / SAFETENSORS_FILENAME

    from safetensors import safe_open

    with safe_open(str(written), "pt") as f:
        metadata = f.metadata()
    assert metadata["hidden_size"] == "40"

    from_st = SPRMHead.from_pretrained(tmp_path / "converted", hidden_size=40)
    for key in HEAD_KEYS:
        assert torch.equal(from_st.state_dict()[key], state[key])
    from_st.eval()
    hidden = torch.randn(7, 40, dtype=dtype)
    assert torch.equal(from_st(hidden), from_pt.eval()(hidden))


def test_convert_to_named_file_and_dtype_override(tmp_path):
    torch.save(_released_state(8), tmp_path / "score_module.pt")
    target = convert_checkpoint(tmp_path / "score_module.pt", tmp_path / "out" / "my_head.safetensors")
    assert target == tmp_path / "out" / "my_head.safetensors" and target.is_file()
    head = SPRMHead.from_pretrained(target, dtype=torch.float16)
    assert head[0].weight.dtype == torch.float16


def test_directory_prefers_safetensors(tmp_path):
    torch.save(_released_state(8, seed=1), tmp_path / RELEASED_FILENAME)
    saved = SPRMHead(8)
    saved.save_pretrained(tmp_path)
    loaded = SPRMHead.from_pretrained(tmp_path)
    assert torch.equal(loaded[0].weight, saved[0].weight)


def test_save_pretrained_creates_directory(tmp_path):
    head = SPRMHead(8, dtype=torch.bfloat16)
    path = head.save_pretrained(tmp_path / "a" / "b")
    assert path.name == SAFETENSORS_FILENAME
    assert SPRMHead.from_pretrained(path)[3].bias.dtype == torch.bfloat16


# ----- checkpoints: everything that must be refused, with a message naming the problem -----------


def test_wrong_hidden_size(tmp_path):
    torch.save(_released_state(16), tmp_path / RELEASED_FILENAME)
    with pytest.raises(CheckpointError, match="hidden size 16 but the model's hidden size is 32"):
        SPRMHead.from_pretrained(tmp_path, hidden_size=32)


def test_missing_key(tmp_path):
    state = _released_state(8)
    del state["3.bias"]
    torch.save(state, tmp_path / RELEASED_FILENAME)
    with pytest.raises(CheckpointError, match=r"missing \['3.bias'\]"):
        SPRMHead.from_pretrained(tmp_path)


def test_extra_key(tmp_path):
    state = _released_state(8)
    state["1.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / RELEASED_FILENAME)
    with pytest.raises(CheckpointError, match=r"unexpected \['1.weight'\]"):
        SPRMHead.from_pretrained(tmp_path)


def test_prefixed_keys_are_named(tmp_path):
    """A whole-model state dict (keys with a prefix) is not silently accepted."""
    state = {f"score_head.{k}": v for k, v in _released_state(8).items()}
    with pytest.raises(CheckpointError, match="missing .*unexpected .*score_head.0.weight"):
        validate_state_dict(state)


@pytest.mark.parametrize("dtype", [torch.int64, torch.float64, torch.uint8])
def test_wrong_dtype(tmp_path, dtype):
    state = _released_state(8)
    state["0.weight"] = state["0.weight"].to(dtype)
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / SAFETENSORS_FILENAME))
    with pytest.raises(CheckpointError, match=f"0.weight has dtype {dtype}"):
        SPRMHead.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "key, shape, words",
    [
        ("0.weight", (16, 9), r"0.weight has shape \(16, 9\), expected \[2d, d\]"),
        ("0.bias", (15,), r"0.bias has shape \(15,\), expected \(16,\) for d=8"),
        ("3.weight", (16,), r"3.weight has shape \(16,\), expected \(1, 16\)"),
        ("3.bias", (2,), r"3.bias has shape \(2,\), expected \(1,\)"),
    ],
)
def test_wrong_shapes(key, shape, words):
    state = _released_state(8)
    state[key] = torch.zeros(shape)
    with pytest.raises(CheckpointError, match=words):
        validate_state_dict(state)


def test_non_tensor_value_and_non_dict_payload(tmp_path):
    state = _released_state(8)
    state["0.bias"] = [0.0] * 16
    with pytest.raises(CheckpointError, match="0.bias is a list, expected a tensor"):
        validate_state_dict(state)
    torch.save(list(_released_state(8).values()), tmp_path / RELEASED_FILENAME)
    with pytest.raises(CheckpointError, match="holds a list, expected a state dict"):
        load_state_dict(tmp_path)


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
@pytest.mark.parametrize("keep_fraction", [0.0, 0.5, 0.98])
def test_truncated_file(tmp_path, fmt, keep_fraction):
    if fmt == "pt":
        path = tmp_path / RELEASED_FILENAME
        torch.save(_released_state(32), path)
    else:
        path = SPRMHead(32).save_pretrained(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])
    words = "not a readable torch checkpoint" if fmt == "pt" else "not a readable safetensors file"
    with pytest.raises(CheckpointError, match=words):
        SPRMHead.from_pretrained(path)


def test_missing_paths(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        SPRMHead.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="expected sprm_head.safetensors or score_module.pt"):
        SPRMHead.from_pretrained(tmp_path)


class _Payload:
    """Unpickling this object (unrestricted) creates ``marker``: the stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _malicious_zip_checkpoint(path: Path, marker: Path) -> None:
    state = _released_state(8)
    state["0.bias"] = _Payload(marker)
    torch.save(state, path)


def _malicious_legacy_pickle(path: Path, marker: Path) -> None:
    with path.open("wb") as f:
        pickle.dump({"0.weight": _Payload(marker)}, f)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", [_malicious_zip_checkpoint, _malicious_legacy_pickle])
def test_malicious_pickle_is_refused_and_never_executed(tmp_path, writer):
    marker = tmp_path / "code_ran"
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    writer(model_dir / RELEASED_FILENAME, marker)

    with pytest.raises(CheckpointError, match="refused") as refused:
        SPRMHead.from_pretrained(model_dir)
    assert "weights_only" not in str(refused.value)  # never advise an unrestricted load
    with pytest.raises(CheckpointError):
        convert_checkpoint(model_dir / RELEASED_FILENAME, tmp_path / "out")
    assert not marker.exists(), "loading the checkpoint executed code from the pickle"
    assert not (tmp_path / "out" / SAFETENSORS_FILENAME).exists()

    # The payload is real: an unrestricted load would have run it. (Proves the check above means something.)
    if writer is _malicious_zip_checkpoint:
        torch.load(model_dir / RELEASED_FILENAME, weights_only=False)
    else:
        with (model_dir / RELEASED_FILENAME).open("rb") as f:
            pickle.load(f)
    assert marker.exists()


def test_safetensors_metadata_is_json_free_strings(tmp_path):
    """The metadata we write is plain strings (safetensors' rule); the format tag is present."""
    path = SPRMHead(8).save_pretrained(tmp_path)
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8 : 8 + header_len])
    assert header["__metadata__"]["hidden_size"] == "8"
    assert set(header) - {"__metadata__"} == set(HEAD_KEYS)


def test_save_pretrained_is_byte_reproducible(tmp_path):
    """safetensors orders metadata by a hash map; the saved file must not depend on it."""
    head = SPRMHead(8)
    files = {head.save_pretrained(tmp_path / str(i)).read_bytes() for i in range(12)}
    assert len(files) == 1
    assert torch.equal(SPRMHead.from_pretrained(tmp_path / "0")[0].weight, head[0].weight)
