"""The ``xbai-kernels`` command: make-tiny-model, convert, demo, bench."""

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
