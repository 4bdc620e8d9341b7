"""The `prunedm` command line. Every job takes --config FILE.yaml, key=value overrides and --out DIR,
where it writes the resolved config, metrics, checkpoints, reports and images; --resume continues."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import warnings
from pathlib import Path

JOBS = {
    "prune": "prune channels (UNets) or blocks (DiTs); writes the pruned model",
    "learn-mask": "learn 2:4 masks (maskllm, maskpro or magnitude); writes the masks and the masked model",
    "finetune": "finetune a model on images (noise-prediction loss, EMA, checkpoints, --resume)",
    "sparsify": "swap Linear/Conv2d layers for 2:4 sparse ones; writes the packed model and a report",
    "sample": "sample images from a UNet; writes a PNG grid and samples.safetensors",
    "eval": "FID and digits-classifier accuracy of samples (from a model, a samples file or a folder)",
}
DEMO_HELP = (
    "the whole pipeline on the shipped digits DDPM: prune, learn 2:4 masks, finetune, sparsify, sample, "
    "eval, bench; writes report.md"
)
# Errors a user can cause with bad input: reported as one line on stderr, exit code 2.
# PRUNEDM_DEBUG=1 re-raises them with the traceback.
USER_ERRORS = (ValueError, TypeError, RuntimeError, OSError, ImportError)
# Files whose presence means a run holds resumable progress, which an error must not delete.
RESUMABLE = ("checkpoints", "learner.safetensors")


def _cmd_info(args: argparse.Namespace) -> int:
    import torch

    import prunedm

    info = {"prunedm": prunedm.__version__, "torch": torch.__version__, **prunedm.extension_info()}
    print(json.dumps(info, indent=2))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    argv = ["--out", args.out, "--device", args.device] + (["--quick"] if args.quick else [])
    try:
        from prunedm.bench import run
    except ModuleNotFoundError as exc:  # an install without bench/run.py: the op benchmarks alone
        if exc.name not in ("prunedm.bench.run", "prunedm.bench"):
            raise
        if args.suite not in (None, "ops"):
            raise ValueError(f"--suite {args.suite}: this install only has the ops benchmarks") from None
        from prunedm.bench import ops

        return ops.main(argv)
    return run.main(argv + (["--suite", args.suite] if args.suite else []))


def _job_defaults(command: str) -> dict:
    if command == "demo":
        from prunedm.cli.demo import DEMO_DEFAULTS

        return DEMO_DEFAULTS
    from prunedm.cli.commands import DEFAULTS

    return DEFAULTS[command]


def _job_runner(command: str):
    if command == "demo":
        from prunedm.cli.commands import run_demo

        return run_demo
    from prunedm.cli.commands import RUNNERS

    return RUNNERS[command]


def _flag_overrides(args: argparse.Namespace) -> list[str]:
    """--seed/--device/--dtype as key=value overrides (they win over the file and earlier overrides)."""
    from prunedm.cli.commands import FLAG_KEYS

    overrides = []
    if getattr(args, "quick", False):
        from prunedm.cli.demo import QUICK_OVERRIDES

        overrides += QUICK_OVERRIDES
    for flag, keys in FLAG_KEYS.items():
        value = getattr(args, flag, None)
        if value is not None:
            key = "seed" if args.command == "demo" and flag == "seed" else keys.get(args.command, flag)
            overrides.append(f"{key}={value}")
    return overrides


def _world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def _init_distributed(command: str, config: dict):
    """Under torchrun (WORLD_SIZE > 1): the process group (nccl on GPUs, gloo on CPU); None otherwise."""
    if _world_size() <= 1:
        return None
    from prunedm.cli.commands import DISTRIBUTED, resolve_device

    if command not in DISTRIBUTED:
        raise ValueError(f"prunedm {command} runs in one process; under torchrun only {', '.join(DISTRIBUTED)} do")
    import torch
    import torch.distributed as dist

    device = resolve_device(config.get("device", "auto"))
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist


def _prepare(args: argparse.Namespace, config: dict, dist) -> Path:
    """Rank 0 creates --out and writes config.yaml; every rank learns whether that worked."""
    from prunedm.cli.config import prepare_out_dir

    if dist is None:
        return prepare_out_dir(args.out, config, args.resume)
    error = None
    if dist.get_rank() == 0:
        try:
            prepare_out_dir(args.out, config, args.resume)
        except USER_ERRORS as exc:
            error = str(exc)
    message = [error]
    dist.broadcast_object_list(message, src=0)
    if message[0] is not None:
        raise ValueError(message[0])
    return Path(args.out)


def _cmd_job(args: argparse.Namespace) -> int:
    from prunedm.cli.config import dumps, load_config

    config = load_config(_job_defaults(args.command), args.config, [*args.overrides, *_flag_overrides(args)])
    out = Path(args.out)
    fresh = not out.exists() or (out.is_dir() and not any(out.iterdir()))
    dist = _init_distributed(args.command, config)
    try:
        out = _prepare(args, config, dist)
        if args.command != "demo" and (dist is None or dist.get_rank() == 0):
            print(f"prunedm {args.command}: writing to {out}\n{dumps(config)}", flush=True)
        _job_runner(args.command)(config, out, args.resume)
    except USER_ERRORS:
        # A new run that failed leaves nothing behind, unless it holds progress that --resume can use.
        if fresh and not args.resume and out.is_dir() and not any((out / name).exists() for name in RESUMABLE):
            if dist is None or dist.get_rank() == 0:
                shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        if dist is not None:
            dist.destroy_process_group()
    return 0


def _add_job_arguments(job: argparse.ArgumentParser, command: str, out_required: bool = True) -> None:
    from prunedm.cli.commands import FLAG_KEYS

    job.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. channels.ratio=0.5")
    job.add_argument("--config", help="YAML file with the run's settings (see configs/)")
    if out_required:
        job.add_argument("--out", required=True, help="output directory")
    job.add_argument("--resume", action="store_true", help="continue the run in --out")
    if command in FLAG_KEYS["seed"] or command == "demo":
        job.add_argument("--seed", type=int, help="random seed (the config's seed)")
    if command in FLAG_KEYS["device"] or command == "demo":
        job.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to run (default: the config's)")
    if command in FLAG_KEYS["dtype"]:
        job.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="compute dtype")
    job.set_defaults(func=_cmd_job)


def build_parser() -> argparse.ArgumentParser:
    """The `prunedm` argument parser: info, bench, demo and the jobs."""
    parser = argparse.ArgumentParser(prog="prunedm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, and which backends (cpu, cuda, triton) are usable and why not")
    info.set_defaults(func=_cmd_info)
    demo = sub.add_parser("demo", help=DEMO_HELP, description=DEMO_HELP)
    demo.add_argument("--out", default="demo-out", help="output directory (default: demo-out)")
    demo.add_argument("--quick", action="store_true", help="a reduced pipeline (a few steps per stage), for tests")
    _add_job_arguments(demo, "demo", out_required=False)
    bench = sub.add_parser("bench", help="benchmark ops, layers and models against dense; JSON, CSV and plots")
    bench.add_argument("--out", required=True)
    bench.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    bench.add_argument("--quick", action="store_true")
    bench.add_argument("--suite", help="comma-separated suites, e.g. ops,layers,models (default: all)")
    bench.set_defaults(func=_cmd_bench)
    for name, help_text in JOBS.items():
        _add_job_arguments(sub.add_parser(name, help=help_text, description=help_text), name)
    return parser


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 600 else text[:597] + "..."


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `prunedm` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        # Library deprecation notices are not the user's to act on; keep stderr for our own messages.
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        try:
            return args.func(args)
        except USER_ERRORS as exc:
            if os.environ.get("PRUNEDM_DEBUG") == "1":
                raise
            print(f"prunedm {args.command}: error: {_one_line(exc)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"prunedm {args.command}: interrupted (rerun with --resume to continue)", file=sys.stderr)
            return 130
