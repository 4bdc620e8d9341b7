"""The `prunedm` command line. Every job takes --config FILE.yaml, key=value overrides and --out DIR,
where it writes the resolved config, metrics, checkpoints, reports and images; --resume continues."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

JOBS = {
    "prune": "prune channels (UNets) or blocks (DiTs); writes the pruned model",
    "learn-mask": "learn 2:4 masks (maskllm, maskpro or magnitude); writes the masks and the masked model",
    "finetune": "finetune a model on images (noise-prediction loss, EMA, checkpoints, --resume)",
    "sparsify": "swap Linear/Conv2d layers for 2:4 sparse ones; writes the packed model and a report",
    "sample": "sample images from a UNet; writes a PNG grid",
}


def _cmd_info(args: argparse.Namespace) -> int:
    import torch

    import prunedm

    info = {"prunedm": prunedm.__version__, "torch": torch.__version__, **prunedm.extension_info()}
    print(json.dumps(info, indent=2))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from prunedm.cli.demo import run_demo

    return run_demo(device=args.device, seed=args.seed)


def _cmd_bench(args: argparse.Namespace) -> int:
    from prunedm.bench import ops

    argv = ["--out", args.out, "--device", args.device] + (["--quick"] if args.quick else [])
    return ops.main(argv)


def _cmd_job(args: argparse.Namespace) -> int:
    from prunedm.cli.commands import DEFAULTS, RUNNERS
    from prunedm.cli.config import dumps, load_config, prepare_out_dir

    config = load_config(DEFAULTS[args.command], args.config, args.overrides)
    out = prepare_out_dir(args.out, config, args.resume)
    print(f"prunedm {args.command}: writing to {out}\n{dumps(config)}")
    RUNNERS[args.command](config, Path(out), args.resume)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunedm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, and which backends (cpu, cuda, triton) are usable and why not")
    info.set_defaults(func=_cmd_info)
    demo = sub.add_parser("demo", help="run the 2:4 pipeline end to end on a built-in example")
    demo.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda when available)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_cmd_demo)
    bench = sub.add_parser("bench", help="benchmark the 2:4 ops against their baselines; JSON and CSV rows")
    bench.add_argument("--out", required=True)
    bench.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    bench.add_argument("--quick", action="store_true")
    bench.set_defaults(func=_cmd_bench)
    for name, help_text in JOBS.items():
        job = sub.add_parser(name, help=help_text)
        job.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. channels.ratio=0.5")
        job.add_argument("--config", help="YAML file with the run's settings")
        job.add_argument("--out", required=True, help="output directory")
        job.add_argument("--resume", action="store_true", help="continue the run in --out")
        job.set_defaults(func=_cmd_job)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, RuntimeError, FileNotFoundError) as exc:
        print(f"prunedm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"prunedm {args.command}: interrupted", file=sys.stderr)
        return 130
