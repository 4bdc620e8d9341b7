"""The `prunedm` command line: `prunedm info` and `prunedm demo` (more subcommands as they land)."""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_info(args: argparse.Namespace) -> int:
    import prunedm

    print(json.dumps(prunedm.extension_info(), indent=2))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from prunedm.cli.demo import run_demo

    return run_demo(device=args.device, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunedm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="which backends (cpu, cuda, triton) are built and usable, and why not")
    info.set_defaults(func=_cmd_info)
    demo = sub.add_parser("demo", help="run the 2:4 pipeline end to end on a built-in example")
    demo.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda when available)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, RuntimeError) as exc:
        print(f"prunedm {args.command}: error: {exc}", file=sys.stderr)
        return 2
