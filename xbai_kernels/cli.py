"""The ``xbai-kernels`` command: make-tiny-model, convert, demo, bench, eval."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _make_tiny_model(args: argparse.Namespace) -> int:
    from .tiny import make_tiny_model

    try:
        directory = make_tiny_model(args.directory, arch=args.arch, seed=args.seed, head_file=args.head_format)
    except OSError as exc:
        print(f"xbai-kernels make-tiny-model: {exc}", file=sys.stderr)
        return 1
    print(f"wrote a tiny {args.arch} model (seed {args.seed}) to {directory}:")
    for path in sorted(directory.iterdir()):
        print(f"  {path.name}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from .head import CheckpointError, convert_checkpoint

    try:
        written = convert_checkpoint(args.src, args.dst)
    except CheckpointError as exc:
        print(f"xbai-kernels convert: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {written}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    if args.num_samples < 1 or args.max_new_tokens < 1:
        print("xbai-kernels demo: -n and --max-new-tokens must be at least 1", file=sys.stderr)
        return 2
    from .head import CheckpointError

    try:
        run_demo(args.model, num_samples=args.num_samples, max_new_tokens=args.max_new_tokens, seed=args.seed)
    except CheckpointError as exc:
        print(f"xbai-kernels demo: {exc}", file=sys.stderr)
        return 1
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .bench import run

    run(args.out, quick=args.quick, device=args.device)
    return 0


def _eval(args: argparse.Namespace) -> int:
    import json

    from .demo import engine_options
    from .head import CheckpointError, check_model_directory
    from .vllm import evaluate, pruning

    where = "xbai-kernels eval"
    try:
        problems = evaluate.load_problems(args.data)
        policy = None if args.no_prune else pruning.normalize_policy(args.prune)
        check_model_directory(args.model)
    except (OSError, ValueError, CheckpointError) as exc:
        print(f"{where}: {exc}", file=sys.stderr)
        return 2
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    from vllm import LLM

    llm = LLM(str(args.model), seed=args.seed, **engine_options())
    try:
        result = evaluate.evaluate(
            llm, problems, modes, prune=policy, chat=not args.raw_prompts,
            max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        )
    except ValueError as exc:
        print(f"{where}: {exc}", file=sys.stderr)
        return 2
    finally:
        llm.llm_engine.engine_core.shutdown()
    result = {"model": str(args.model), "data": str(args.data), **result}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    evaluate.plot(result, args.out / "eval.png")
    for run in result["runs"]:
        label = f"{run['mode']:>6} N={run['n']:<2} {'pruned' if run['prune'] else 'full':>6}"
        print(f"{label}: accuracy {run['accuracy']:.1%} (any candidate {run['any_correct']:.1%}), "
              f"{run['decode_tokens']} decode tokens, {run['seconds']:.1f} s, {run['pruned_fraction']:.0%} pruned")
    print(f"wrote {args.out / 'eval.json'} and {args.out / 'eval.png'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xbai-kernels", description="SPRM step-reward head kernels for XBai o4 / MetaStone-S1."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    tiny = commands.add_parser(
        "make-tiny-model", help="write a deterministic tiny Qwen model, tokenizer and SPRM head (no network)"
    )
    tiny.add_argument("directory", type=Path)
    tiny.add_argument("--arch", choices=("qwen2", "qwen3"), default="qwen3")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument(
        "--head-format",
        choices=("safetensors", "pt"),
        default="safetensors",
        help="sprm_head.safetensors, or the released score_module.pt layout",
    )
    tiny.set_defaults(run=_make_tiny_model)

    convert = commands.add_parser("convert", help="validate a head checkpoint (score_module.pt) and write safetensors")
    convert.add_argument("src", type=Path, help="score_module.pt, a head file, or a model directory")
    convert.add_argument("dst", type=Path, help="a directory (gets sprm_head.safetensors) or a .safetensors path")
    convert.set_defaults(run=_convert)

    demo = commands.add_parser("demo", help="Best-of-N with step scores on a tiny local model")
    demo.add_argument("--model", type=Path, default=None, help="model directory (default: the cached tiny model)")
    demo.add_argument("-n", "--num-samples", type=int, default=4)
    demo.add_argument("--max-new-tokens", type=int, default=96)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)

    bench = commands.add_parser(
        "bench",
        help="time the package's calls on this machine under each backend that runs here",
        description="Time the head, DecodeScorer.step, score_trajectories and sprm_head_loss under each backend "
        "that runs here. On a CPU only the reference path runs and the numbers are the host's (noise-bound); "
        "kernel timings need a GPU. The repository's benchmarks/ folder holds the maintainers' suites.",
    )
    bench.add_argument("--out", type=Path, default=Path("xbai-kernels-bench"), help="results folder (default: %(default)s)")
    bench.add_argument("--quick", action="store_true", help="one width, fewer repetitions")
    bench.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    bench.set_defaults(run=_bench)

    evaluation = commands.add_parser(
        "eval",
        help="Best-of-N with and without pruning on problems with answers (vLLM): accuracy, tokens, time",
        description="Best-of-N at each mode, unpruned and with a pruning policy, on a JSONL of problems "
        '({"problem": ..., "answer": ...} per line; the last \\boxed{} of the pick is compared). '
        "Random weights answer nothing: judge a policy with a real checkpoint.",
    )
    evaluation.add_argument("data", type=Path, help="JSONL: one problem (problem, question or prompt) and answer per line")
    evaluation.add_argument("--model", type=Path, required=True, help="model directory with an SPRM head")
    evaluation.add_argument("--modes", default="low,medium,high", help="comma list of low, medium, high (N = 2, 8, 32)")
    evaluation.add_argument(
        "--prune", default='{"policy": "relative"}',
        help="the policy, JSON (default: %(default)s, whose own defaults keep half the candidates past step 4 and a "
        "quarter past step 8)",
    )
    evaluation.add_argument("--no-prune", action="store_true", help="unpruned runs only")
    evaluation.add_argument("--max-tokens", type=int, default=32768)
    evaluation.add_argument("--temperature", type=float, default=0.7)
    evaluation.add_argument("--top-p", type=float, default=0.95)
    evaluation.add_argument("--seed", type=int, default=0)
    evaluation.add_argument("--raw-prompts", action="store_true", help="send problems as they are, without the chat template")
    evaluation.add_argument("--out", type=Path, default=Path("xbai-eval"), help="results folder (default: %(default)s)")
    evaluation.set_defaults(run=_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
