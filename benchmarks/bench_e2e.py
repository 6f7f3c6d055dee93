"""End-to-end cost of step scoring during generation, on random-weight models of the released shapes.

Four ways to get step scores for B sampled trajectories of N new tokens:

* ``off``: generation alone (the denominator);
* ``ours``: ``DecodeScorer.step`` after every sampled token, on ``h`` captured at the last decoder
  layer's input (no host sync, head work only on step rows);
* ``eager_hook``: the released head (``nn.Sequential`` in the model dtype) hooked into the same loop;
* ``released``: the released pipeline: generate, then run the backbone again over every finished
  trajectory with ``output_hidden_states=True`` and score the steps (its cost is the re-forward).

Two decode loops, each its own row of the results:

* ``cuda_graph`` (what serving engines do): a transformers ``StaticCache``, static input buffers, and
  the one-token decode step (forward, Gumbel-max sampling, and for ``ours`` the scorer step, for
  ``eager_hook`` the head) captured in CUDA graphs, replayed once per token. The boolean-mask gather
  of the hooked head synchronizes with the host and cannot be captured, so in this loop the hooked
  head runs on all B rows and the step mask is applied after ("without gathering"). Attention reads
  the static cache up to a bucket boundary (one graph per bucket), not the whole allocation.
* ``eager``: HuggingFace's forward called from Python with a dynamic cache (host-bound: every kernel
  launch is paid on the host), the hooked head on the boolean-mask gather of the step rows.

Times are whole decodes (CUDA events around all N steps in graph mode, wall time of the whole
generation in eager mode), repeated and interleaved off / ours / eager_hook so drift cancels; the
overhead of a mode is (median t_mode - median t_off) / median t_off. After an ``ours`` run the scores
the scorer recorded are compared with the released path's (re-forward + ``score_trajectories``).

Random weights sample near-uniform tokens, so a real step token would almost never appear. By default
the step set has one id, like the English rule (``.\\n\\n``), and the sampler adds a fixed logit bias to
it so that ``step_fraction`` of the sampled tokens are steps, about the rate of real reasoning text (one
step every ~40 tokens); the bias is the same in every mode. ``--step-ids 0`` instead makes every
``1/step_fraction``-th vocabulary id a step token with no bias (a set of thousands of ids, like the
Chinese rule's).

    python -m benchmarks e2e [--quick] [--models 1.5b,7b] [--batch 1,16,64] [--new-tokens 2048] ...
"""

from __future__ import annotations

import argparse
import statistics
import time
import traceback

import torch
from torch import nn

from xbai_kernels import DecodeScorer, SPRMHead, StepRule, score_trajectories
from xbai_kernels.ops import reference

from ._common import MODEL_SHAPES, copy_bandwidth, environment, progress, write_result
from .decode_loops import TEMPERATURE, LastLayerInput, StaticDecoder, generate, sync

MODES = ("off", "ours", "eager_hook")
# Largest |step score| difference between in-decode scoring and the re-forward that still counts as a
# match: decode and the whole-sequence forward compute h with different kernels, which round bf16
# differently; the error grows with depth and width (H200, 2048 tokens: up to 0.019 at the 1.5B shape,
# 0.078 at 7B, with the step positions always equal). Tables show the positions check and the
# difference itself, not this threshold.
MATCH_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.05, torch.float16: 0.05}


def build_model(shape: str, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(**MODEL_SHAPES[shape], max_position_embeddings=32768, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def released_head(head: SPRMHead, dtype) -> nn.Sequential:
    """The released module: nn.Sequential(Linear, ReLU, Dropout, Linear) in the model dtype."""
    d = head.hidden_size
    module = nn.Sequential(nn.Linear(d, 2 * d), nn.ReLU(), nn.Dropout(0.5), nn.Linear(2 * d, 1))
    module.load_state_dict(head.state_dict())
    return module.to(device=head[0].weight.device, dtype=dtype).eval()


def step_rule_for(vocab_size: int, step_fraction: float, step_ids: int = 1, device=None) -> tuple[StepRule, torch.Tensor]:
    """The step rule of the benchmark and the sampler's logit bias, float32 [vocab_size].

    ``step_ids`` > 0: that many ids spread over the vocabulary, biased so that near-uniform sampling
    draws a step token with probability ``step_fraction``; 0: every ``1/step_fraction``-th id, no
    bias. The two highest ids outside the set are ``<think>`` and ``</think>``."""
    bias = torch.zeros(vocab_size, dtype=torch.float32, device=device)
    if step_ids > 0:
        ids = tuple(range(0, vocab_size - 2, (vocab_size - 2) // step_ids))[:step_ids]
        odds = step_fraction / (1 - step_fraction) * (vocab_size - len(ids)) / len(ids)
        bias[list(ids)] = float(torch.tensor(odds).log())
    else:
        ids = tuple(range(0, vocab_size - 2, max(1, round(1 / step_fraction))))
    in_set = set(ids)
    markers = [i for i in range(vocab_size - 1, 0, -1) if i not in in_set][:2]
    return StepRule(ids, markers[1], markers[0]), bias


# ----- one case: a model, a batch size, a decode loop --------------------------------------------------


def released_pipeline(model, head, rule, ids: torch.Tensor) -> tuple[list, float]:
    """Re-forward every finished trajectory with ``output_hidden_states=True`` and score it, as the
    released scoring server does. Returns the TrajectoryScore of each row and the seconds it took."""
    device = ids.device
    with torch.inference_mode():
        model(input_ids=ids[:1], output_hidden_states=True)  # allocator warm-up at this length
        sync(device)
        start = time.perf_counter()
        scores = []
        for row in ids:
            hidden = model(input_ids=row[None], output_hidden_states=True).hidden_states[-2][0]
            scores.append(score_trajectories(hidden, row, head, rule)[0])
        sync(device)
    return scores, time.perf_counter() - start


def compare_with_released(scorer: DecodeScorer, released: list, num_tokens: int, dtype) -> dict:
    """Per trajectory: the same step positions, step scores within MATCH_TOLERANCE."""
    positions_equal, max_diff, steps = True, 0.0, 0
    for slot, expected in enumerate(released):
        ours = scorer.result(slot, num_tokens=num_tokens)
        steps += ours.positions.numel()
        if not torch.equal(ours.positions, expected.positions.cpu()):
            positions_equal = False
            continue
        if ours.positions.numel():
            max_diff = max(max_diff, float((ours.step_scores - expected.step_scores.cpu()).abs().max()))
    tolerance = MATCH_TOLERANCE[dtype]
    return {
        "match": positions_equal and max_diff <= tolerance,
        "positions_equal": positions_equal,
        "max_abs_step_score_diff": max_diff,
        "tolerance": tolerance,
        "steps_scored": steps,
    }


def summarize(case: dict, times: dict[str, list[float]], new_tokens: int, released_s: float | None) -> None:
    """Medians, overheads and per-step costs of one case, from the interleaved whole-run times."""
    case["times_s"] = times
    median = {mode: statistics.median(ts) for mode, ts in times.items()}
    off = median["off"]
    case["off_s"] = off
    # Run-to-run spread of generation alone: differences smaller than this are noise.
    case["off_spread_pct"] = 100.0 * (max(times["off"]) - min(times["off"])) / off
    case["off_tokens_per_s"] = case["batch"] * new_tokens / off
    for mode in ("ours", "eager_hook"):
        case[f"{mode}_s"] = median[mode]
        case[f"{mode}_overhead_pct"] = 100.0 * (median[mode] - off) / off
        case[f"{mode}_us_per_step"] = 1e6 * (median[mode] - off) / new_tokens
    if released_s is not None:
        case["released_s"] = released_s
        case["released_overhead_pct"] = 100.0 * released_s / off
        ours_cost = median["ours"] - off
        # A non-positive difference means ours is within the run-to-run noise: no ratio to give.
        case["released_over_ours"] = released_s / ours_cost if ours_cost > 0 else None
        if case.get("ours_step_graph_us"):
            case["released_over_ours_isolated"] = released_s / (1e-6 * case["ours_step_graph_us"] * new_tokens)


def scoring_functions(head, rule, batch, capacity, device, dtype, gather: bool):
    """The ``ours`` scorer (DecodeScorer) and the hooked released head, as ``score(h, sampled, positions)``.

    ``gather``: the hook runs on the boolean-mask gather of the step rows (host sync: eager loop only);
    otherwise on every row with the step mask applied after (graph-capturable)."""
    scorer = DecodeScorer(head, rule, num_slots=batch, capacity=capacity)
    slots = torch.arange(batch, device=device)
    released = released_head(head, dtype)
    step_ids, step_table = rule.step_ids_tensor(device), rule.step_table(device)
    hook_out = torch.zeros(batch, dtype=torch.float32, device=device)

    def ours(hidden, sampled, positions):
        scorer.step(hidden, sampled, slots, positions)

    def eager_hook(hidden, sampled, positions):
        if gather:
            torch.sigmoid(released(hidden[torch.isin(sampled, step_ids)]).float())
        else:
            in_set = reference.is_step_token(sampled, step_table)
            torch.mul(torch.sigmoid(released(hidden).float()).squeeze(-1), in_set, out=hook_out)

    return scorer, {"off": None, "ours": ours, "eager_hook": eager_hook}


def graph_case(model, head, rule, logit_bias, prompts, new_tokens, reps, buckets, seed) -> dict:
    batch, prompt_len = prompts.shape
    device, dtype = prompts.device, model.dtype
    case = {"batch": batch, "decode": "cuda_graph" if device.type == "cuda" else "static_cache_no_graph",
            "eager_hook_variant": "all rows, step mask applied after (the boolean gather syncs: not capturable)"}
    decoder = StaticDecoder(model, batch, prompt_len, new_tokens, buckets, logit_bias)
    scorer, scores = scoring_functions(head, rule, batch, 2 * (prompt_len + new_tokens), device, dtype, gather=False)
    slots = list(range(batch))

    def prefill_scores(hidden):
        scorer.reset(slots)
        for slot in slots:
            scorer.prefill(slot, hidden[slot], prompts[slot], 0)

    try:
        case["kv_bucket_ends"] = decoder.bucket_ends
        for mode in MODES:
            decoder.capture(mode, scores[mode], prompts)
        times: dict[str, list[float]] = {mode: [] for mode in MODES}
        released_s = None
        for rep in range(reps):
            for mode in MODES:
                on_prefill = prefill_scores if mode == "ours" else None
                times[mode].append(decoder.run(mode, scores[mode], prompts, seed, on_prefill))
                if mode == "ours" and rep == 0:
                    ids = decoder.ids.clone()
                    released, released_s = released_pipeline(model, head, rule, ids)
                    case.update(compare_with_released(scorer, released, ids.shape[1], dtype))
        if decoder.use_graphs:
            case["ours_step_graph_us"] = isolated_step_us(scorer, decoder, new_tokens)
        summarize(case, times, new_tokens, released_s)
    finally:
        decoder.close()
    return case


def isolated_step_us(scorer: DecodeScorer, decoder: StaticDecoder, calls: int) -> float:
    """us per ``DecodeScorer.step`` replayed alone in a CUDA graph on the last decode step's inputs."""
    device = decoder.device
    hidden = decoder.hidden.value[:, -1].clone()
    sampled = decoder.ids[:, -1].clone()
    positions = decoder.position_ids[:, 0].clone()
    slots = torch.arange(decoder.batch, device=device)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        scorer.step(hidden, sampled, slots, positions)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        scorer.step(hidden, sampled, slots, positions)
    graph.replay()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(calls):
        graph.replay()
    end.record()
    end.synchronize()
    scorer.reset(list(range(decoder.batch)))
    return 1e3 * begin.elapsed_time(end) / calls


def eager_case(model, head, rule, logit_bias, prompts, new_tokens, reps, seed) -> dict:
    batch, prompt_len = prompts.shape
    device, dtype = prompts.device, model.dtype
    case = {"batch": batch, "decode": "eager", "eager_hook_variant": "boolean-mask gather of the step rows (syncs with the host)"}
    capture = LastLayerInput(model)
    scorer, scores = scoring_functions(head, rule, batch, 2 * (prompt_len + new_tokens), device, dtype, gather=True)
    slots = torch.arange(batch, device=device)

    # Host seconds inside each mode's scoring calls. The loop is host-bound (the GPU waits for the
    # next launch), so a call's host time is what it adds to the step; whole-run differences of a
    # ~20 ms step carry a run-to-run spread of several percent, far above the scorer's share.
    host_s = {mode: 0.0 for mode in MODES}

    def on_token(mode):
        def hook(sampled, position):
            begin = time.perf_counter()
            if mode == "ours" and position == prompt_len - 1:
                # The prompt's own steps: scored from the prefill pass, one chunk per trajectory.
                for slot in range(batch):
                    scorer.prefill(slot, capture.value[slot, :-1], prompts[slot], 0)
            positions = torch.full((batch,), position, dtype=torch.int64, device=device)
            scores[mode](capture.value[:, -1], sampled, positions)
            host_s[mode] += time.perf_counter() - begin
        return None if mode == "off" else hook

    try:
        # A full-length warm-up (the caching allocator sees every KV-cache size once; without it the
        # first run was 2-3x slower on the H200), then short ones that compile the scorer (Triton JIT).
        generate(model, prompts, new_tokens, logit_bias, seed=seed)
        for mode in ("ours", "eager_hook"):
            generate(model, prompts, min(new_tokens, 8), logit_bias, on_token=on_token(mode), seed=seed)
        times: dict[str, list[float]] = {mode: [] for mode in MODES}
        released_s = None
        host_s.update({mode: 0.0 for mode in MODES})
        for rep in range(reps):
            for mode in MODES:
                scorer.reset(slots)
                ids, seconds = generate(model, prompts, new_tokens, logit_bias, on_token=on_token(mode), seed=seed)
                times[mode].append(seconds)
                if mode == "ours" and rep == 0:
                    released, released_s = released_pipeline(model, head, rule, ids)
                    case.update(compare_with_released(scorer, released, ids.shape[1], dtype))
        summarize(case, times, new_tokens, released_s)
        for mode in ("ours", "eager_hook"):
            case[f"{mode}_host_us_per_step"] = 1e6 * host_s[mode] / (reps * new_tokens)
            case[f"{mode}_host_overhead_pct"] = 100.0 * host_s[mode] / reps / case["off_s"]
    finally:
        capture.remove()
    return case


def run_case(model, head, rule, logit_bias, batch, decode, args, device, bandwidth=None) -> dict:
    """One row of the results: ``decode`` "graph" (falling back to eager if capture fails) or "eager"."""
    vocab = model.config.vocab_size
    prompts = torch.randint(0, vocab, (batch, args.prompt_tokens), device=device,
                            generator=torch.Generator(device=device).manual_seed(batch))
    new_tokens = args.new_tokens if decode == "graph" else args.eager_new_tokens
    case, error = None, None
    if decode == "graph":
        try:
            case = graph_case(model, head, rule, logit_bias, prompts, new_tokens, args.reps, args.kv_buckets, seed=batch)
        except Exception as exc:  # recorded, and this row falls back to the eager loop
            error = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
            new_tokens = args.eager_new_tokens
            sync(device)
    if case is None:
        case = eager_case(model, head, rule, logit_bias, prompts, new_tokens, args.reps, seed=batch)
        if error:
            case["graph_error"] = error
    case.update(batch=batch, prompt_tokens=args.prompt_tokens, new_tokens=new_tokens, reps=args.reps)
    if bandwidth:
        # What a decode step cannot beat: reading every weight once.
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        case["decode_step_floor_us"] = 1e6 * weight_bytes / bandwidth
    return case


# ----- report ------------------------------------------------------------------------------------


def _pct(value) -> str:
    return "-" if value is None else f"{value:.2f}%"


def _num(value, fmt: str = ".0f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{fmt}}{suffix}"


def _host(case: dict, mode: str, kind: str) -> str:
    """' (host x)': the eager loop's host time inside the scoring calls, as % of generation or us/step."""
    if kind == "pct":
        value = case.get(f"{mode}_host_overhead_pct")
        return "" if value is None else f" ({value:.2f}%)"
    value = case.get(f"{mode}_host_us_per_step")
    return "" if value is None else f" ({value:.0f})"


def markdown_table(result: dict) -> str:
    """README table: tokens/s without scoring, each mode's overhead and the released/ours ratio."""
    env = result["environment"]
    lines = [
        f"End to end on {env['device']} (torch {env['torch']}, {result['config']['dtype']}; {env['date'][:10]}). "
        f"{result['config'].get('step_ids', '?')} step id(s), {100 * result['config']['step_fraction']:.1f}% of sampled tokens are steps. "
        f"Overhead = (median decode time with scoring - without) / without, {result['config']['reps']} "
        "interleaved repetitions (spread: max - min of the runs without scoring); `cuda_graph`: StaticCache, "
        "whole decode step in a CUDA graph (the hooked head on all rows, mask after); `eager`: HuggingFace "
        "forward from Python, dynamic cache (host-bound: there the whole-run difference is within the spread, "
        "and the host time inside the scoring calls, in parentheses, is the overhead).",
        "",
        "| model | decode | B | new tokens | tok/s, no scoring | spread | ours | ours, us/step | ours alone in a graph, us/step "
        "| eager head hooked in | released (re-forward) | released / ours | same step positions as the re-forward "
        "| max abs step-score difference |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for c in result["cases"]:
        same = "-" if "positions_equal" not in c else ("yes" if c["positions_equal"] else "NO")
        diff = _num(c.get("max_abs_step_score_diff"), ".3f")
        decode = c["decode"] + (" (graph failed)" if c.get("graph_error") else "")
        lines.append(
            f"| {c['model']} | {decode} | {c['batch']} | {c['new_tokens']} | {c['off_tokens_per_s']:.0f} | "
            f"{_pct(c.get('off_spread_pct'))} | {_pct(c['ours_overhead_pct'])}{_host(c, 'ours', 'pct')} | "
            f"{_num(c['ours_us_per_step'])}{_host(c, 'ours', 'us')} | {_num(c.get('ours_step_graph_us'), '.1f')} | "
            f"{_pct(c['eager_hook_overhead_pct'])}{_host(c, 'eager_hook', 'pct')} | {_pct(c.get('released_overhead_pct'))} | "
            f"{_num(c.get('released_over_ours'), '.0f', 'x')} | {same} | {diff} |"
        )
    return "\n".join(lines)


def plot(result: dict, path) -> None:
    """Overhead of each way of scoring, in % of generation time, against the batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = result["cases"]
    models = sorted({c["model"] for c in cases})
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 3.8), squeeze=False)
    for ax, model in zip(axes[0], models):
        for decode in sorted({c["decode"] for c in cases if c["model"] == model}):
            rows = [c for c in cases if c["model"] == model and c["decode"] == decode]
            batches = [c["batch"] for c in rows]
            style = "-" if decode == "cuda_graph" else "--"
            for mode, label in (("ours", "ours"), ("eager_hook", "head hooked in"), ("released", "released re-forward")):
                values = [c.get(f"{mode}_overhead_pct") for c in rows]
                # Overheads within the noise can be negative: drawn at the axis floor.
                ax.plot(batches, [max(v, 1e-3) if v is not None else float("nan") for v in values],
                        style, marker="o", label=f"{label}, {decode}")
        ax.axhline(1.0, color="gray", linestyle=":", label="1% goal")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel("scoring overhead, % of generation time")
        ax.set_title(f"{model} ({result['environment']['device']})")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _line(c: dict) -> str:
    match = c.get("match")
    return (
        f"{c['model']:>5} {c['decode']:<10} B={c['batch']:<3} N={c['new_tokens']:<5} off {c['off_tokens_per_s']:9.1f} tok/s "
        f"| ours {c['ours_overhead_pct']:6.2f}% ({c['ours_us_per_step']:.0f} us/step"
        f"{', alone %.1f us' % c['ours_step_graph_us'] if c.get('ours_step_graph_us') else ''}) "
        f"| hook {c['eager_hook_overhead_pct']:6.2f}% | released {_pct(c.get('released_overhead_pct'))} "
        f"| released/ours {_num(c.get('released_over_ours'), '.1f', 'x')} | match {match}"
        + (f" | graph failed: {c['graph_error']}" if c.get("graph_error") else "")
    )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks e2e", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="1.5b,7b", help="comma list of: " + ", ".join(MODEL_SHAPES))
    parser.add_argument("--batch", default="1,16,64", help="batch sizes of the CUDA-graph loop")
    parser.add_argument("--new-tokens", type=int, default=2048, help="tokens per trajectory, CUDA-graph loop")
    parser.add_argument("--decode", default="graph,eager", help="decode loops: graph, eager or both")
    parser.add_argument("--eager-batch", default="16", help="batch sizes of the eager (host-bound) loop")
    parser.add_argument("--eager-new-tokens", type=int, default=256,
                        help="tokens per trajectory, eager loop (host-bound: ~20 ms a step at every shape)")
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions of each mode")
    parser.add_argument("--kv-buckets", type=int, default=4, help="CUDA graphs per mode, by cache length")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--step-fraction", type=float, default=0.025, help="fraction of sampled tokens that are steps")
    parser.add_argument("--step-ids", type=int, default=1,
                        help="size of the step-token set (1: like the English rule; 0: every 1/step_fraction-th id)")
    parser.add_argument("--quick", action="store_true", help="1.5b (tiny on a CPU), B 16, 64 tokens (16 eager), one bucket")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<device>-e2e.json)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.quick:
        args.models = "1.5b" if device.type == "cuda" else "tiny"
        args.batch = args.eager_batch = "16" if device.type == "cuda" else "4"
        args.new_tokens, args.eager_new_tokens, args.kv_buckets = 64, 16, 1
    if args.reps < 1:
        raise SystemExit("--reps must be at least 1")

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    bandwidth = copy_bandwidth(device) if device.type == "cuda" else None
    loops = [d for d in args.decode.split(",") if d]
    if not set(loops) <= {"graph", "eager"}:
        raise SystemExit(f"--decode: expected graph and/or eager, got {args.decode!r}")
    plan = [
        (shape, decode, int(b))
        for shape in args.models.split(",")
        for decode in loops
        for b in (args.batch if decode == "graph" else args.eager_batch).split(",")
    ]
    cases, loaded = [], None
    for shape, decode, batch in progress(plan, "e2e", lambda p: f"{p[0]} {p[1]} B={p[2]}"):
        if loaded is None or loaded[0] != shape:
            loaded = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            model = build_model(shape, device, dtype)
            torch.manual_seed(1)
            head = SPRMHead(model.config.hidden_size, device=device, dtype=dtype)
            rule, logit_bias = step_rule_for(model.config.vocab_size, args.step_fraction, args.step_ids, device)
            loaded = (shape, model, head, rule, logit_bias)
        _, model, head, rule, logit_bias = loaded
        case = run_case(model, head, rule, logit_bias, batch, decode, args, device, bandwidth)
        case["model"] = shape
        cases.append(case)
        print(_line(case), flush=True)
    result = {
        "benchmark": "e2e",
        "environment": environment(device),
        "config": {
            "dtype": str(dtype).removeprefix("torch."),
            "step_fraction": args.step_fraction,
            "step_ids": len(rule.step_token_ids) if cases else args.step_ids,
            "step_sampling": "logit bias on the step ids" if args.step_ids > 0 else "every 1/step_fraction-th id, no bias",
            "reps": args.reps,
            "quick": args.quick,
            "kv_buckets": args.kv_buckets,
            "sampling": f"Gumbel-max at T={TEMPERATURE} (graph loop), multinomial at T={TEMPERATURE} (eager loop)",
            "overhead": "(median whole-decode time with scoring - without) / without; modes interleaved per repetition",
            "released": "re-forward of each finished trajectory (output_hidden_states=True) + score_trajectories; "
                        "its overhead is its time over the decode time without scoring",
            "copy_bandwidth_bytes_per_s": bandwidth,
        },
        "cases": cases,
    }
    # A quick run never overwrites the full results the README shows.
    name = f"{result['environment']['device_slug']}-e2e{'-quick' if args.quick else ''}.json"
    write_result(result, args.out, name, plot)
    print(markdown_table(result))
    return result


if __name__ == "__main__":
    main()
