"""Peak memory of one SPRM training step: ``apply_sprm`` against the released actor's score path.

Both variants run the same forward on the same packed micro batch (verl's remove-padding layout)
and the same backward. ``released``: ``output_hidden_states=True``, ``hidden_states[-2]`` scaled as
``h * 1e-4 + h.detach() * (1 - 1e-4)`` over every token, boolean gather, ``nn.Sequential`` head,
eager loss (``tests/released_actor.py``, the restatement the tests check against). ``patched``: the model
patched by ``xbai_kernels.transformers.apply_sprm`` called with ``sprm_rewards``.

Modes: ``full`` (backbone and head trained; loss = language-model cross-entropy + SPR loss, as the
actor adds the score loss to its policy loss), with and without gradient checkpointing; and
``head_only`` (frozen backbone, SPR loss only, ``logits_to_keep=1`` in both variants).

Peak memory = the most bytes held by tensors during the step above what was held before it: on
CUDA ``torch.cuda.max_memory_allocated``; on the CPU the allocation timeline of PyTorch's profiler
(``profile_memory=True``), which sees every tensor allocation (tracemalloc does not see them, and
RSS mixes in the allocator's caching). Shapes: ``tiny`` (the tiny Qwen2 of the tests), ``1.5b``
(Qwen2 shape of the 1.5B model, random weights).

    python benchmarks/bench_train_memory.py --device cpu --shape tiny
    python benchmarks/bench_train_memory.py --device cuda --shape 1.5b --tokens 8192
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the released restatement the tests check against
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import environment, write_result  # noqa: E402
from released_actor import released_score_path, rmpad, verl_batch  # noqa: E402

from xbai_kernels.ops import dispatch  # noqa: E402
from xbai_kernels.transformers import HEAD_ATTRIBUTE, apply_sprm, revert_sprm  # noqa: E402
from xbai_kernels.verl import as_sprm_head  # noqa: E402

SHAPES = {
    # The tiny model of tests/ and python/ (xbai_kernels.tiny), Qwen2 flavour.
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, vocab_size=515),
    # MetaStone-S1-1.5B / Qwen2.5-1.5B.
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936),
}
MODES = ("full", "full_checkpointing", "head_only")


def build_model(shape: str, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(
        **SHAPES[shape], max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1e6,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def micro_batch(tokens: int, vocab_size: int, step_id: int, sequences: int = 8):
    """A verl micro batch of ``sequences`` trajectories, ``tokens`` in all once padding is removed:
    a quarter prompt, the rest response, a step token every ~40 tokens."""
    per_sequence = tokens // sequences
    prompt = per_sequence // 4
    response = per_sequence - prompt
    batch = verl_batch(
        0, [prompt] * sequences, [response] * sequences, prompt_width=prompt, response_width=response,
        step_rate=1 / 40, vocab_size=vocab_size, step_id=step_id,
    )
    rewards = torch.tensor([1.0, 0.0] * (sequences // 2) + [1.0] * (sequences % 2))
    return rmpad(batch), rewards


def released_head(hidden_size: int, device, dtype):
    from torch import nn

    torch.manual_seed(1)
    return nn.Sequential(
        nn.Linear(hidden_size, 2 * hidden_size), nn.ReLU(), nn.Dropout(0.5), nn.Linear(2 * hidden_size, 1)
    ).to(device=device, dtype=dtype)


def lm_loss(logits: torch.Tensor, rm) -> torch.Tensor:
    """Next-token cross-entropy on the packed row, standing in for the actor's policy loss."""
    labels = torch.roll(rm.input_ids[0], shifts=-1)
    return torch.nn.functional.cross_entropy(logits[0].float(), labels)


class PaddedView:
    """The same micro batch as ``sequences`` equal-length rows without padding: [B, T] ids, no
    attention mask (the causal kernels, no [T, T] mask), and the released code's view of it (its
    packed row is these rows back to back, so ``hidden_states[-2]`` flattens to it)."""

    def __init__(self, rm):
        self.rows = rm.batch_size
        self.input_ids = rm.input_ids.reshape(self.rows, -1)
        self.response_mask = rm.response_mask.reshape(self.rows, -1)
        if self.input_ids.shape[1] * self.rows != rm.input_ids.shape[1]:
            raise ValueError("the padded layout needs sequences of equal length")


def forward_inputs(rm, layout: str) -> dict:
    if layout == "padded":
        view = PaddedView(rm)
        return {"input_ids": view.input_ids}
    return {"input_ids": rm.input_ids, "position_ids": rm.position_ids}


def released_step(model, head, rm, rewards, step_id: int, mode: str, layout: str) -> torch.Tensor:
    extra = {"logits_to_keep": 1} if mode == "head_only" else {}
    output = model(**forward_inputs(rm, layout), use_cache=False, output_hidden_states=True, **extra)
    if layout == "padded":
        # The released score path reads hidden_states[-2][0]: the rows back to back, as its packed row.
        d = output.hidden_states[-2].shape[-1]
        flat = type(output)(hidden_states=(None, output.hidden_states[-2].reshape(1, -1, d), None))
        loss, *_ = released_score_path(flat, rm, rewards, head, step_id)
    else:
        loss, *_ = released_score_path(output, rm, rewards, head, step_id)
    if mode != "head_only":
        loss = loss + lm_loss(output.logits.reshape(1, -1, output.logits.shape[-1]), rm)
    return loss


def patched_step(model, rm, rewards, mode: str, layout: str) -> torch.Tensor:
    extra = {"logits_to_keep": 1} if mode == "head_only" else {}
    response = PaddedView(rm).response_mask if layout == "padded" else rm.response_mask
    output = model(**forward_inputs(rm, layout), sprm_rewards=rewards, sprm_response_mask=response, **extra)
    loss = output.sprm_loss
    if mode != "head_only":
        loss = loss + lm_loss(output.logits.reshape(1, -1, output.logits.shape[-1]), rm)
    return loss


@contextlib.contextmanager
def cpu_peak_meter(result: dict):
    """Peak bytes of CPU tensors allocated inside the block, above the level at its start."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        yield
    # The profiler's allocation timeline: (time, action, (tensor key, version), bytes).
    timeline = prof._memory_profile().timeline
    live = peak = 0
    for _, action, _, size in sorted(timeline, key=lambda event: event[0]):
        if action.name == "CREATE":
            live += size
        elif action.name == "DESTROY":
            live -= size
        peak = max(peak, live)
    result["peak_bytes"] = peak


@contextlib.contextmanager
def cuda_peak_meter(result: dict):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    yield
    torch.cuda.synchronize()
    result["peak_bytes"] = torch.cuda.max_memory_allocated() - base


def measure(variant, mode, layout, model, head, rm, rewards, step_id, device, autocast_dtype, repeats: int):
    """Peak bytes of one step (fresh grads each time); the first, unmeasured step warms up workspaces."""
    meter = cuda_peak_meter if device.type == "cuda" else cpu_peak_meter
    peaks, seconds = [], []
    for attempt in range(repeats + 1):
        model.zero_grad(set_to_none=True)
        if head is not None:
            head.zero_grad(set_to_none=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        result = {}
        start = time.perf_counter()
        with meter(result) if attempt else contextlib.nullcontext():
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                if variant == "released":
                    loss = released_step(model, head, rm, rewards, step_id, mode, layout)
                else:
                    loss = patched_step(model, rm, rewards, mode, layout)
            loss.backward()
            del loss
        if device.type == "cuda":
            torch.cuda.synchronize()
        if attempt:
            peaks.append(result["peak_bytes"])
            seconds.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    return {"peak_bytes": max(peaks), "peak_bytes_all": peaks, "step_seconds_median": statistics.median(seconds)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--layouts", default="padded,packed",
                        help="padded: equal-length rows, causal kernels; packed: verl's remove-padding row")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", help="results file (default: benchmarks/results/<device>-train-memory.json)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    # Weights in bf16 run under autocast, as the released actor does; fp32 runs without.
    autocast_dtype = torch.bfloat16 if dtype == torch.bfloat16 else None
    model = build_model(args.shape, dtype, device)
    vocab = model.config.vocab_size
    step_id = vocab - 1
    rm, rewards = micro_batch(args.tokens, vocab, step_id)
    rm = type(rm)(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(rm).items()})
    rewards = rewards.to(device)
    d = model.config.hidden_size
    # The SPRM head trains in fp32 in both variants (xbai's default; the released head under autocast).
    head = released_head(d, device, torch.float32)
    rows = []
    for layout in args.layouts.split(","):
        for mode in args.modes.split(","):
            if mode == "full_checkpointing":
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_disable()
            model.train()
            head.eval()  # dropout off: both variants see the same logits
            model.requires_grad_(mode != "head_only")
            for variant in ("released", "patched"):
                if variant == "patched":
                    apply_sprm(model, head=as_sprm_head(copy.deepcopy(head)), rule=step_id)
                    getattr(model, HEAD_ATTRIBUTE).eval()
                try:
                    numbers = measure(variant, mode, layout, model, head, rm, rewards, step_id, device,
                                      autocast_dtype, args.repeats)
                except Exception as exc:  # one failing variant must not lose the others' numbers
                    numbers = {"error": f"{type(exc).__name__}: {exc}"}
                finally:
                    if variant == "patched":
                        revert_sprm(model)
                rows.append({"layout": layout, "mode": mode, "variant": variant, **numbers})
                if "error" in numbers:
                    print(f"{layout:7s} {mode:20s} {variant:9s} FAILED {numbers['error'][:200]}", flush=True)
                else:
                    print(f"{layout:7s} {mode:20s} {variant:9s} peak {numbers['peak_bytes'] / 2**20:10.1f} MiB  "
                          f"step {numbers['step_seconds_median']:.3f} s", flush=True)

    env = environment(device)
    saved = {}
    for row in rows:
        key = f"{row['layout']}/{row['mode']}"
        entry = saved.setdefault(key, {"released_mib": None, "patched_mib": None})
        if "peak_bytes" in row:
            entry[f"{row['variant']}_mib"] = row["peak_bytes"] / 2**20
    for entry in saved.values():
        if entry["released_mib"] is not None and entry["patched_mib"] is not None:
            entry["saved_mib"] = entry["released_mib"] - entry["patched_mib"]
            entry["patched_lower"] = entry["patched_mib"] < entry["released_mib"]
    result = {
        "benchmark": "train_memory",
        **env,
        "shape": {"name": args.shape, **SHAPES[args.shape]},
        "tokens": int(rm.input_ids.shape[1]),
        "sequences": rm.batch_size,
        "step_rows": int(((torch.roll(rm.input_ids, -1, 1) == step_id) & (torch.roll(rm.response_mask, -1, 1) == 1)).sum()),
        "weights_dtype": args.dtype,
        "autocast": str(autocast_dtype) if autocast_dtype else None,
        "sprm_head_loss_backend": dispatch.resolve("sprm_head_loss", device)[0],
        "peak_meter": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "torch.profiler allocation timeline",
        "rows": rows,
        "summary": saved,
    }
    slug = env["device_slug"]
    write_result(result, args.out, f"{slug}-train-memory.json")
    print("\nlayout/mode                 released MiB  patched MiB   saved MiB")
    for key, entry in saved.items():
        if "saved_mib" in entry:
            print(f"{key:27s} {entry['released_mib']:12.1f} {entry['patched_mib']:12.1f} {entry['saved_mib']:11.1f}")
        else:
            print(f"{key:27s} (a variant failed: see rows)")
    return result


if __name__ == "__main__":
    main()


def markdown_table(result: dict) -> str:
    """README table: peak memory of one training step, released score path vs apply_sprm."""
    lines = [
        f"Training-step peak memory on {result['device']} ({result['shape']} shape, {result['tokens']} tokens, "
        f"{result['weights_dtype']}, sprm_head_loss backend `{result['sprm_head_loss_backend']}`; {result['date'][:10]}):",
        "",
        "| layout / mode | released (output_hidden_states) MiB | apply_sprm MiB | saved MiB |",
        "|---|---:|---:|---:|",
    ]
    for key, row in result["summary"].items():
        lines.append(f"| {key} | {row['released_mib']:.1f} | {row['patched_mib']:.1f} | {row['saved_mib']:.1f} |")
    return "\n".join(lines)
