"""The ``xbai-kernels`` command: make-tiny-model, convert, demo, bench."""

from __future__ import annotations

import argparse
import subprocess
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


def find_benchmarks() -> Path | None:
    """The source checkout that holds the ``benchmarks`` package: the working directory, or the
    checkout this package is installed from in editable mode."""
    here = Path(__file__).resolve().parent.parent
    for root in (Path.cwd(), here):
        if (root / "benchmarks" / "__main__.py").is_file():
            return root
    return None


def _bench(bench_args: list[str]) -> int:
    root = find_benchmarks()
    if root is None:
        print(
            "xbai-kernels bench: the benchmarks package (benchmarks/__main__.py) was not found in the "
            "working directory or beside the installed package; run it from a source checkout",
            file=sys.stderr,
        )
        return 2
    return subprocess.call([sys.executable, "-m", "benchmarks", *bench_args], cwd=root)


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

    # Listed for --help; its arguments are passed through untouched (see main).
    commands.add_parser("bench", help="run the benchmark suite (python -m benchmarks ARGS...)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return _bench(argv[1:])
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
