"""End-to-end cost of step scoring during generation, on random-weight models of the released shapes.

Four ways to get step scores for B sampled trajectories of N new tokens:

* ``off``: generation alone (the denominator);
* ``ours``: ``DecodeScorer.step`` after every sampled token, on ``h`` captured at the last decoder
  layer's input (no host sync, head work only on step rows);
* ``eager_hook``: the released head (``nn.Sequential`` in the model dtype) hooked into the same loop,
  on the boolean-mask gather of the step rows;
* ``released``: the released pipeline: generate, then run the backbone again over every finished
  trajectory with ``output_hidden_states=True`` and score the steps (its cost is the re-forward).

Random weights sample near-uniform tokens, so real step tokens would almost never appear; the step set
here is every ``1/step_fraction``-th vocabulary id, which gives about the step rate of real reasoning
text (``.\\n\\n`` every ~40 tokens). The decode loop is HuggingFace eager with a dynamic cache, the
same for every mode, so the overhead percentages compare like with like.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from xbai_kernels import DecodeScorer, SPRMHead, StepRule, score_trajectories

from ._common import copy_bandwidth, environment, write_result

MODEL_SHAPES = {
    # Qwen2 shapes of the released 1.5B and 7B models.
    "1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960, vocab_size=151936),
    "7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
               intermediate_size=18944, vocab_size=152064),
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                 intermediate_size=256, vocab_size=1024),
}


def build_model(shape: str, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(**MODEL_SHAPES[shape], max_position_embeddings=32768, tie_word_embeddings=False)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


class LastLayerInput:
    """Forward pre-hook keeping ``h`` (SPEC: the input of the last decoder layer) of the latest call, [B, L, d]."""

    def __init__(self, model) -> None:
        self.value: torch.Tensor | None = None
        self._handle = model.model.layers[-1].register_forward_pre_hook(self._keep, with_kwargs=True)

    def _keep(self, module, args, kwargs):
        self.value = args[0] if args else kwargs["hidden_states"]

    def remove(self) -> None:
        self._handle.remove()


@torch.inference_mode()
def generate(model, prompts, new_tokens, on_token=None, temperature=0.7, seed=0):
    """Sample ``new_tokens`` tokens for every row of ``prompts`` [B, P].

    Returns ids [B, P + N], the loop's seconds, and the seconds spent in ``on_token`` (bracketed by
    device synchronizations, so it is the whole cost of the scoring work, host stalls included).
    """
    from transformers import DynamicCache

    generator = torch.Generator(device=prompts.device).manual_seed(seed)
    batch, prompt_len = prompts.shape
    cache = DynamicCache()
    tokens = torch.empty(batch, new_tokens, dtype=torch.int64, device=prompts.device)
    scoring = 0.0
    sync(prompts.device)
    start = time.perf_counter()
    step_input = prompts
    for t in range(new_tokens):
        out = model(input_ids=step_input, past_key_values=cache, use_cache=True)
        probs = torch.softmax(out.logits[:, -1].float() / temperature, dim=-1)
        sampled = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        if on_token is not None:
            sync(prompts.device)
            begin = time.perf_counter()
            on_token(sampled, prompt_len + t - 1)
            sync(prompts.device)
            scoring += time.perf_counter() - begin
        tokens[:, t] = sampled
        step_input = sampled[:, None]
    sync(prompts.device)
    seconds = time.perf_counter() - start
    return torch.cat([prompts, tokens], dim=1), seconds, scoring


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def released_head(head: SPRMHead, dtype) -> nn.Sequential:
    """The released module: nn.Sequential(Linear, ReLU, Dropout, Linear) in the model dtype."""
    d = head.hidden_size
    module = nn.Sequential(nn.Linear(d, 2 * d), nn.ReLU(), nn.Dropout(0.5), nn.Linear(2 * d, 1))
    module.load_state_dict(head.state_dict())
    return module.to(device=head[0].weight.device, dtype=dtype).eval()


def run_case(model, head, rule, batch, prompt_len, new_tokens, device, dtype, seed, bandwidth=None):
    vocab = model.config.vocab_size
    generator = torch.Generator(device=device).manual_seed(seed)
    prompts = torch.randint(0, vocab, (batch, prompt_len), device=device, generator=generator)
    step_ids = rule.step_ids_tensor(device)
    capture = LastLayerInput(model)
    result = {"batch": batch, "prompt_tokens": prompt_len, "new_tokens": new_tokens}
    try:
        # A full-length warm-up: the caching allocator sees every KV-cache size once, so the timed
        # runs do not pay for cudaMalloc (the first run was 2-3x slower on the H200 without it).
        generate(model, prompts, new_tokens, seed=seed)
        _, result["off_s"], _ = generate(model, prompts, new_tokens, seed=seed)

        scorer = DecodeScorer(head, rule, num_slots=batch, capacity=new_tokens + prompt_len)
        slots = torch.arange(batch, device=device)

        def ours(sampled, position):
            if position == prompt_len - 1:
                # The prompt's own steps: scored from the prefill pass, one chunk per trajectory.
                for slot in range(batch):
                    scorer.prefill(slot, capture.value[slot, :-1], prompts[slot], 0)
            positions = torch.full((batch,), position, dtype=torch.int64, device=device)
            scorer.step(capture.value[:, -1], sampled, slots, positions)

        # Compile the scorer's kernels (Triton JIT) outside the timed run, then start clean.
        generate(model, prompts, min(new_tokens, 8), on_token=ours, seed=seed)
        scorer.reset(slots)
        ids_ours, result["ours_loop_s"], result["ours_scoring_s"] = generate(
            model, prompts, new_tokens, on_token=ours, seed=seed
        )

        eager = released_head(head, dtype)

        def eager_hook(sampled, position):
            rows = torch.isin(sampled, step_ids)
            torch.sigmoid(eager(capture.value[:, -1][rows]).float())

        generate(model, prompts, min(new_tokens, 8), on_token=eager_hook, seed=seed)

        _, result["eager_hook_loop_s"], result["eager_hook_scoring_s"] = generate(
            model, prompts, new_tokens, on_token=eager_hook, seed=seed
        )
    finally:
        capture.remove()

    # The released pipeline: a second backbone pass over every finished trajectory, here the very
    # trajectories our scorer saw, so the two sets of scores can be compared.
    sync(device)
    start = time.perf_counter()
    released_scores = []
    with torch.inference_mode():
        for row in ids_ours:
            hidden = model(input_ids=row[None], output_hidden_states=True).hidden_states[-2][0]
            released_scores.append(score_trajectories(hidden, row, head, rule).scores)
    sync(device)
    result["released_scoring_s"] = time.perf_counter() - start

    ours_scores = torch.tensor([scorer.result(s).score for s in range(batch)])
    result["trajectory_scores_ours"] = ours_scores.tolist()
    # Decode (one token at a time) and the re-forward (whole sequence) round bf16 differently.
    result["max_abs_score_diff_vs_rescore"] = float(
        (ours_scores - torch.stack(released_scores).cpu().flatten()).abs().max()
    )
    result["steps_scored"] = int(sum(scorer.result(s).positions.numel() for s in range(batch)))
    result["off_tokens_per_s"] = batch * new_tokens / result["off_s"]
    for mode in ("ours", "eager_hook", "released"):
        result[f"{mode}_overhead_pct"] = 100.0 * result[f"{mode}_scoring_s"] / result["off_s"]
    result["ours_scoring_us_per_step"] = 1e6 * result["ours_scoring_s"] / new_tokens
    result["released_scoring_cost_over_ours"] = result["released_scoring_s"] / result["ours_scoring_s"]
    if bandwidth:
        # What an engine with CUDA graphs approaches: one decode step reads every weight once.
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        result["decode_step_floor_us"] = 1e6 * weight_bytes / bandwidth
        result["ours_pct_of_floor_step"] = 100.0 * result["ours_scoring_us_per_step"] / result["decode_step_floor_us"]
    return result


def step_rule_for(vocab_size: int, step_fraction: float) -> StepRule:
    """Every ``1/step_fraction``-th id is a step token; the two ids after the last are the markers."""
    stride = max(1, round(1 / step_fraction))
    step_ids = tuple(range(0, vocab_size - 2, stride))
    markers = [i for i in range(vocab_size - 1, 0, -1) if i % stride][:2]
    return StepRule(step_ids, markers[1], markers[0])


def markdown_table(result: dict) -> str:
    """README table: tokens/s without scoring and each mode's overhead, per model and batch."""
    env = result["environment"]
    lines = [
        f"End to end on {env['device']} (torch {env['torch']}, {result['config']['dtype']}, "
        f"{result['config']['decode_loop']}; {env['date'][:10]}):",
        "",
        "| model | B | new tokens | tok/s, no scoring | ours | ours, us/step | ours / floor decode step | eager head hooked in | released (re-forward) | released / ours scoring cost |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in result["cases"]:
        lines.append(
            f"| {c['model']} | {c['batch']} | {c['new_tokens']} | {c['off_tokens_per_s']:.0f} | "
            f"{c['ours_overhead_pct']:.2f}% | {c['ours_scoring_us_per_step']:.0f} | "
            f"{c.get('ours_pct_of_floor_step', float('nan')):.1f}% | {c['eager_hook_overhead_pct']:.2f}% | "
            f"{c['released_overhead_pct']:.1f}% | {c['released_scoring_cost_over_ours']:.0f}x |"
        )
    return "\n".join(lines)


def plot(result: dict, path) -> None:
    """Overhead of each way of scoring, in % of generation time, against the batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({c["model"] for c in result["cases"]})
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.6), squeeze=False)
    for ax, model in zip(axes[0], models):
        cases = [c for c in result["cases"] if c["model"] == model]
        batches = [c["batch"] for c in cases]
        for mode, label in (("ours", "ours (in-decode)"), ("eager_hook", "eager head hooked in"), ("released", "released re-forward")):
            ax.plot(batches, [max(c[f"{mode}_overhead_pct"], 1e-3) for c in cases], marker="o", label=label)
        ax.axhline(1.0, color="gray", linestyle=":", label="1% goal")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel("scoring overhead, % of generation time")
        ax.set_title(f"{model} ({result['environment']['device']})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks e2e", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="1.5b,7b", help="comma list of: " + ", ".join(MODEL_SHAPES))
    parser.add_argument("--batch", default="1,16,64", help="comma list of batch sizes")
    parser.add_argument("--new-tokens", type=int, default=2048)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--step-fraction", type=float, default=0.025, help="fraction of the vocabulary that are step tokens")
    parser.add_argument("--quick", action="store_true", help="1.5b, B 1 and 16, 256 new tokens")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<device>-e2e.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.batch, args.new_tokens = "1.5b", "1,16", 256

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cases = []
    bandwidth = copy_bandwidth(device) if device.type == "cuda" else None
    for shape in args.models.split(","):
        model = build_model(shape, device, dtype)
        torch.manual_seed(1)
        head = SPRMHead(model.config.hidden_size, device=device, dtype=dtype)
        rule = step_rule_for(model.config.vocab_size, args.step_fraction)
        for batch in (int(b) for b in args.batch.split(",")):
            case = run_case(
                model, head, rule, batch, args.prompt_tokens, args.new_tokens, device, dtype, seed=batch, bandwidth=bandwidth
            )
            case["model"] = shape
            cases.append(case)
            print(
                f"{shape:>5} B={batch:<3} off {case['off_tokens_per_s']:9.1f} tok/s | ours {case['ours_overhead_pct']:6.2f}% "
                f"({case['ours_scoring_us_per_step']:.0f} us/step) | eager hook {case['eager_hook_overhead_pct']:6.2f}% "
                f"| released {case['released_overhead_pct']:7.2f}% | released/ours scoring cost "
                f"{case['released_scoring_cost_over_ours']:6.1f}x | max score diff {case['max_abs_score_diff_vs_rescore']:.3g}",
                flush=True,
            )
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result = {
        "benchmark": "e2e",
        "environment": environment(device),
        "config": {
            "dtype": str(dtype).removeprefix("torch."),
            "step_fraction": args.step_fraction,
            "decode_loop": "HuggingFace eager forward, DynamicCache, multinomial sampling at T=0.7",
            "overhead": "seconds in the scoring work (bracketed by device syncs) over the seconds of generation without scoring",
            "copy_bandwidth_bytes_per_s": bandwidth,
        },
        "cases": cases,
    }
    target = write_result(result, args.out, f"{result['environment']['device_slug']}-e2e.json")
    plot(result, target.with_suffix(".png"))
    print(markdown_table(result))
    return result


if __name__ == "__main__":
    main()
