"""Shared fixtures: the golden vectors of the released code (tests/data, never edited) and a tiny model.

Tests that take a ``trajectory_index`` or ``loss_index`` argument are run once per golden case
(see ``pytest_generate_tests``), so a failure names the case.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import torch

from xbai_kernels import SPRMHead, StepRule

GOLDEN_PATH = Path(__file__).parent / "data" / "sprm_reference.safetensors"
# The golden heads: hidden sizes the released code was run with.
GOLDEN_HIDDEN_SIZES = (64, 96)


@dataclass(frozen=True)
class GoldenTrajectory:
    """Trajectory k of the golden file; the per-d tensors are keyed by hidden size."""

    index: int
    name: str
    ids: torch.Tensor  # int64 [L]
    mask: torch.Tensor  # bool [L]
    rule: StepRule
    hidden: dict[int, torch.Tensor]  # d -> float32 [L, d]
    logits: dict[int, torch.Tensor]  # d -> float32 [n]
    scores: dict[int, torch.Tensor]  # d -> float32 [n]
    value: dict[int, float]  # d -> trajectory score


@dataclass(frozen=True)
class GoldenLoss:
    index: int
    logits: torch.Tensor  # float32 [6, 50]
    rewards: torch.Tensor  # float32 [6]
    values: torch.Tensor  # float32 [ranks]
    geomean: torch.Tensor  # float32 [6]
    ranks: int


@dataclass(frozen=True)
class Golden:
    think_start_id: int
    think_end_id: int
    trajectories: tuple[GoldenTrajectory, ...]
    losses: tuple[GoldenLoss, ...]
    head_states: dict[int, dict[str, torch.Tensor]]

    def head(self, d: int) -> SPRMHead:
        """A fresh eval-mode head loaded with the golden weights of hidden size ``d``."""
        head = SPRMHead(d)
        head.load_state_dict(self.head_states[d])
        return head.eval()


def _meta() -> dict:
    from safetensors import safe_open

    with safe_open(str(GOLDEN_PATH), "pt") as f:
        return json.loads(f.metadata()["meta"])


@cache
def load_golden() -> Golden:
    from safetensors import safe_open

    meta = _meta()
    trajectories, losses = [], []
    with safe_open(str(GOLDEN_PATH), "pt") as f:
        head_states = {
            d: {key: f.get_tensor(f"head{d}.{key}") for key in ("0.weight", "0.bias", "3.weight", "3.bias")}
            for d in GOLDEN_HIDDEN_SIZES
        }
        for case in meta["cases"]:
            name = case["name"]
            if name.startswith("seq"):
                k = int(name[3:])
                rule = StepRule(tuple(case["step_token_ids"]), meta["think_start_id"], meta["think_end_id"])
                trajectories.append(
                    GoldenTrajectory(
                        index=k,
                        name=name,
                        ids=f.get_tensor(f"ids_{k}"),
                        mask=f.get_tensor(f"mask_{k}").bool(),
                        rule=rule,
                        hidden={d: f.get_tensor(f"hidden{d}_{k}") for d in GOLDEN_HIDDEN_SIZES},
                        logits={d: f.get_tensor(f"logits{d}_{k}") for d in GOLDEN_HIDDEN_SIZES},
                        scores={d: f.get_tensor(f"scores{d}_{k}") for d in GOLDEN_HIDDEN_SIZES},
                        value={d: float(f.get_tensor(f"value{d}_{k}")[0]) for d in GOLDEN_HIDDEN_SIZES},
                    )
                )
            elif name.startswith("loss"):
                c = int(name[4:])
                losses.append(
                    GoldenLoss(
                        index=c,
                        logits=f.get_tensor(f"loss_logits_{c}"),
                        rewards=f.get_tensor(f"loss_reward_{c}"),
                        values=f.get_tensor(f"loss_value_{c}"),
                        geomean=f.get_tensor(f"loss_geomean_{c}"),
                        ranks=int(case["ranks"]),
                    )
                )
    trajectories.sort(key=lambda t: t.index)
    losses.sort(key=lambda c: c.index)
    return Golden(meta["think_start_id"], meta["think_end_id"], tuple(trajectories), tuple(losses), head_states)


@pytest.fixture(scope="session")
def golden() -> Golden:
    return load_golden()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "trajectory_index" in metafunc.fixturenames or "loss_index" in metafunc.fixturenames:
        meta = _meta()
        names = [case["name"] for case in meta["cases"]]
    if "trajectory_index" in metafunc.fixturenames:
        seqs = [name for name in names if name.startswith("seq")]
        metafunc.parametrize("trajectory_index", [int(n[3:]) for n in seqs], ids=seqs)
    if "loss_index" in metafunc.fixturenames:
        cases = [name for name in names if name.startswith("loss")]
        metafunc.parametrize("loss_index", [int(n[4:]) for n in cases], ids=cases)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Qwen3 model + tokenizer + safetensors SPRM head, built once per session (~5 s)."""
    from xbai_kernels.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen3", arch="qwen3", seed=0)
