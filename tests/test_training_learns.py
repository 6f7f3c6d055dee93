"""SPR training through apply_sprm learns: on python/train_sprm_tiny.py's synthetic task, a few hundred
CPU steps raise the step-score AUC between correct and wrong trajectories above 0.9."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "python" / "train_sprm_tiny.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("train_sprm_tiny", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("train_sprm_tiny", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return _load_script()


def _held_out(script, task):
    generator = torch.Generator().manual_seed(10_000)
    return [script.make_batch(task, 64, generator) for _ in range(4)]


def test_auc_is_the_mann_whitney_statistic(script):
    assert script.auc(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0])) == 1.0
    assert script.auc(torch.tensor([1.0]), torch.tensor([2.0])) == 0.0
    assert script.auc(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 2.0])) == 0.5
    assert script.auc(torch.tensor([2.0]), torch.tensor([2.0])) == 0.5


def test_synthetic_batches_follow_the_training_layout(script):
    model, task = script.build_model()
    batch = script.make_batch(task, 8, torch.Generator().manual_seed(0))
    ids, response = batch["input_ids"], batch["sprm_response_mask"].bool()
    # Every step token is in the response and is preceded by a verdict token.
    steps = ids == task.step_id
    assert steps.any() and not (steps & ~response).any()
    verdicts = torch.cat([task.correct_verdicts, task.wrong_verdicts])
    before = torch.roll(ids, 1, dims=1)[steps]
    assert torch.isin(before, verdicts).all()
    out = model(**batch)
    assert torch.equal(out.sprm_stats["logits"] != 0, torch.roll(steps, -1, dims=1))


def test_head_training_raises_step_score_auc_above_0_9(script):
    torch.set_num_threads(1)  # the tiny model gains nothing from threads; the machine is shared
    model, task = script.build_model(seed=0)
    evaluation = _held_out(script, task)
    before = script.trajectory_auc(model, evaluation)
    losses = script.train_loop(model, task, steps=200, batch_size=16, lr=2e-3, seed=0)
    after = script.trajectory_auc(model, evaluation)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert after > 0.9, f"AUC {before:.3f} -> {after:.3f}"
    assert after - before > 0.15, f"AUC {before:.3f} -> {after:.3f}: training should be what separates them"


def test_backbone_training_moves_the_backbone_through_the_scaled_path(script):
    torch.set_num_threads(1)
    model, task = script.build_model(seed=1, train_backbone=True)
    embeddings = model.get_input_embeddings().weight
    start = embeddings.detach().clone()
    script.train_loop(model, task, steps=3, batch_size=8, lr=1e-3, seed=1)
    assert not torch.equal(embeddings.detach(), start)
    # The LM head and final norm only see the language-model loss, which this loop does not use.
    assert model.lm_head.weight.grad is None


def test_trainer_path_trains_the_head(script, tmp_path):
    pytest.importorskip("accelerate", reason="HuggingFace Trainer needs accelerate (extra 'train')")
    torch.set_num_threads(1)
    model, task = script.build_model(seed=0)
    head = model.get_submodule("sprm_head")
    start = head[0].weight.detach().clone()
    losses = script.train_with_trainer(model, task, steps=4, batch_size=8, output_dir=str(tmp_path))
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(head[0].weight.detach(), start)
