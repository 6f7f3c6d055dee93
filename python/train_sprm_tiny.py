"""Train the SPRM head (and optionally the backbone) of the tiny model on a synthetic task, on the CPU.

The task: every trajectory is a prompt and a response of reasoning steps, each step some words, a
"verdict" token and ".\\n\\n". Correct trajectories mostly use verdict tokens of one set, wrong ones
of another (``--noise`` of the steps use the other set), so the hidden state at the position that
produces the step token (the training position) tells them apart, learnably. Training uses
``xbai_kernels.transformers.apply_sprm`` and the SPR loss; the step-score AUC between correct and
wrong trajectories (trajectory score = geometric mean of its step scores) is printed before and after.

    python python/train_sprm_tiny.py                       # plain loop, head only
    python python/train_sprm_tiny.py --train-backbone      # backbone too (its gradient scaled by 1e-4)
    python python/train_sprm_tiny.py --trainer             # HuggingFace Trainer (needs accelerate)
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xbai_kernels import StepRule  # noqa: E402
from xbai_kernels.tiny import build_config, build_tokenizer  # noqa: E402
from xbai_kernels.transformers import HEAD_ATTRIBUTE, apply_sprm  # noqa: E402

VERDICT_SETS = (("the", "answer", "is", "so"), ("wait", "check", "verify", "case"))


@dataclass
class SyntheticTask:
    """Token ids of the synthetic task: filler words, and the two verdict sets (correct, wrong)."""

    words: torch.Tensor  # int64 [W]
    correct_verdicts: torch.Tensor  # int64 [V]
    wrong_verdicts: torch.Tensor  # int64 [V]
    step_id: int
    pad_id: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "SyntheticTask":
        def single_ids(texts):
            ids = [tokenizer.encode(" " + t, add_special_tokens=False) for t in texts]
            return [i[0] for i in ids if len(i) == 1]

        correct, wrong = (torch.tensor(single_ids(s)) for s in VERDICT_SETS)
        verdicts = set(correct.tolist()) | set(wrong.tolist())
        specials = set(tokenizer.all_special_ids) | set(tokenizer.convert_tokens_to_ids(["<think>", "</think>"]))
        rule = StepRule.from_tokenizer(tokenizer)
        words = [i for i in range(len(tokenizer)) if i not in verdicts | specials and i not in rule.step_token_ids]
        return cls(torch.tensor(words), correct, wrong, rule.step_token_id, tokenizer.pad_token_id)


def make_batch(task: SyntheticTask, batch_size: int, generator: torch.Generator, noise: float = 0.15):
    """A right-padded batch: input_ids/attention_mask/sprm_response_mask [B, T], sprm_rewards [B] (1 or 0)."""
    rows, response_starts = [], []
    rewards = (torch.rand(batch_size, generator=generator) < 0.5).float()
    for correct in rewards.bool().tolist():
        prompt = task.words[torch.randint(len(task.words), (int(torch.randint(3, 7, (1,), generator=generator)),), generator=generator)]
        response = []
        for _ in range(int(torch.randint(3, 7, (1,), generator=generator))):
            filler = task.words[torch.randint(len(task.words), (int(torch.randint(2, 6, (1,), generator=generator)),), generator=generator)]
            use_own_set = bool(torch.rand(1, generator=generator) >= noise)
            verdicts = task.correct_verdicts if correct == use_own_set else task.wrong_verdicts
            verdict = verdicts[torch.randint(len(verdicts), (1,), generator=generator)]
            response += [filler, verdict, torch.tensor([task.step_id])]
        rows.append(torch.cat([prompt] + response))
        response_starts.append(len(prompt))
    length = max(len(r) for r in rows)
    input_ids = torch.full((batch_size, length), task.pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch_size, length), dtype=torch.long)
    response_mask = torch.zeros((batch_size, length), dtype=torch.long)
    for b, (row, start) in enumerate(zip(rows, response_starts)):
        input_ids[b, : len(row)] = row
        attention_mask[b, : len(row)] = 1
        response_mask[b, start : len(row)] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "sprm_response_mask": response_mask,
        "sprm_rewards": rewards,
    }


def auc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """P(a positive scores above a negative), ties counting half (the Mann-Whitney AUC)."""
    diff = positive[:, None] - negative[None, :]
    return float(((diff > 0).float() + 0.5 * (diff == 0).float()).mean())


@torch.no_grad()
def trajectory_auc(model, batches) -> float:
    """AUC of the trajectory scores (geometric mean of step scores) between correct and wrong trajectories."""
    was_training = model.training
    model.eval()
    scores, labels = [], []
    for batch in batches:
        out = model(**batch)
        scores.append(out.sprm_stats["step_score_geomean"])
        labels.append(batch["sprm_rewards"] > 0.5)
    model.train(was_training)
    scores, labels = torch.cat(scores), torch.cat(labels)
    return auc(scores[labels], scores[~labels])


def build_model(arch: str = "qwen3", seed: int = 0, train_backbone: bool = False):
    """The tiny model (random backbone), patched with a new SPRM head; and the task."""
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer(seed=seed)
    config = build_config(arch, len(tokenizer), tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # A random model's embeddings have std 0.02: h would be tiny next to the head's biases and the
    # head would start out blind to the tokens. Unit-scale embeddings stand in for a trained backbone.
    with torch.no_grad():
        embeddings = model.get_input_embeddings().weight
        embeddings.mul_(1.0 / embeddings.std())
    model.requires_grad_(train_backbone)
    apply_sprm(model, rule=StepRule.from_tokenizer(tokenizer))
    return model, SyntheticTask.from_tokenizer(tokenizer)


def train_loop(model, task, steps: int, batch_size: int = 16, lr: float = 2e-3, seed: int = 0, log_every: int = 0):
    """Plain loop: Adam on every trainable parameter, the SPR loss only. Returns the loss per step."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for step in range(steps):
        out = model(**make_batch(task, batch_size, generator))
        optimizer.zero_grad(set_to_none=True)
        out.sprm_loss.backward()
        optimizer.step()
        losses.append(out.sprm_loss.item())
        if log_every and (step + 1) % log_every == 0:
            stats = out.sprm_stats
            print(
                f"step {step + 1:4d}  loss {losses[-1]:.4f}  kept +{int(stats['num_positive'])} "
                f"-{int(stats['num_negative'])}"
            )
    return losses


def train_with_trainer(model, task, steps: int, batch_size: int = 16, lr: float = 2e-3, seed: int = 0, output_dir="/tmp/sprm_trainer"):
    """The same training through HuggingFace ``Trainer``: the dataset yields the ``sprm_*`` columns
    (kept because the patched forward names them), ``compute_loss`` returns ``outputs.sprm_loss``."""
    from transformers import Trainer, TrainingArguments

    generator = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(steps):
        batch = make_batch(task, batch_size, generator)
        examples.append(batch)

    class PreBatched(torch.utils.data.Dataset):
        def __len__(self):
            return len(examples)

        def __getitem__(self, index):
            return examples[index]

    class SPRMTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            outputs = model(**inputs)
            return (outputs.sprm_loss, outputs) if return_outputs else outputs.sprm_loss

    args = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=1,
        max_steps=steps,
        learning_rate=lr,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        weight_decay=0.0,
        logging_steps=max(1, steps // 10),
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=seed,
        dataloader_num_workers=0,
    )
    trainer = SPRMTrainer(model=model, args=args, train_dataset=PreBatched(), data_collator=lambda items: items[0])
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=("qwen2", "qwen3"), default="qwen3")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-backbone", action="store_true", help="also train the backbone (gradient scaled by 1e-4)")
    parser.add_argument("--trainer", action="store_true", help="use HuggingFace Trainer instead of the plain loop")
    parser.add_argument("--save", type=Path, help="write the trained head (sprm_head.safetensors) into this directory")
    args = parser.parse_args(argv)

    torch.set_num_threads(min(torch.get_num_threads(), 4))
    model, task = build_model(args.arch, args.seed, args.train_backbone)
    held_out = torch.Generator().manual_seed(10_000 + args.seed)
    evaluation = [make_batch(task, 64, held_out) for _ in range(4)]
    print(f"step-score AUC before: {trajectory_auc(model, evaluation):.3f}")
    start = time.perf_counter()
    if args.trainer:
        losses = train_with_trainer(model, task, args.steps, args.batch_size, args.lr, args.seed)
    else:
        losses = train_loop(model, task, args.steps, args.batch_size, args.lr, args.seed, log_every=max(1, args.steps // 10))
    print(f"trained {args.steps} steps in {time.perf_counter() - start:.1f} s, last loss {losses[-1]:.4f}")
    print(f"step-score AUC after:  {trajectory_auc(model, evaluation):.3f}")
    if args.save:
        print(f"head written to {getattr(model, HEAD_ATTRIBUTE).save_pretrained(args.save)}")


if __name__ == "__main__":
    main()
