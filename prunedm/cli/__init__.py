"""The `prunedm` command line. Every job takes --config FILE.yaml, key=value overrides and --out DIR,
where it writes the resolved config, metrics, checkpoints, reports and images; --resume continues."""

from __future__ import annotations

import argparse
import importlib
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
SELFTEST_HELP = (
    "test prunedm's sparse kernels on every visible GPU against the reference (a kernel that fails is never "
    "used); prints the table, exit 1 when one is quarantined"
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


def _cmd_selftest(args: argparse.Namespace) -> int:
    from prunedm.nn import _selftest

    return _selftest.main(["--force"] if args.force else [])


BENCH_SUITES = ("ops", "layers", "models")


def _bench_device(name: str) -> str:
    """--device of `prunedm bench` as the suites take it: auto becomes cuda when visible, else cpu."""
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.suite is not None:
        suites = [s.strip() for s in args.suite.split(",") if s.strip()]
        if not suites or set(suites) - set(BENCH_SUITES):
            raise ValueError(f"--suite takes a comma-separated subset of {', '.join(BENCH_SUITES)}, got {args.suite!r}")
    argv = ["--out", args.out, "--device", _bench_device(args.device)] + (["--quick"] if args.quick else [])
    try:
        run = importlib.import_module("prunedm.bench.run")
    except ModuleNotFoundError as exc:  # an install without bench/run.py: the op benchmarks alone
        if exc.name not in ("prunedm.bench.run", "prunedm.bench"):
            raise
        if args.suite not in (None, "ops"):
            raise ValueError(f"--suite {args.suite}: this install only has the ops benchmarks") from None
        from prunedm.bench import ops

        return ops.main(argv)
    return run.main(argv + (["--suite", args.suite] if args.suite else []))


def _job_defaults(args: argparse.Namespace) -> dict:
    """The job's defaults; for `demo --quick` with the quick settings on top (a config file and the
    user's key=value and flags still win over them)."""
    from prunedm.cli.schema import job_defaults

    defaults = job_defaults(args.command)
    if getattr(args, "quick", False):
        from prunedm.cli.config import load_config
        from prunedm.cli.demo import QUICK_OVERRIDES

        defaults = load_config(defaults, None, QUICK_OVERRIDES)
    return defaults


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


def _holds_progress(out: Path) -> bool:
    """Whether `out` holds work that --resume would continue (the demo's stages keep theirs one level down)."""
    for where in (out, *(p for p in out.iterdir() if p.is_dir() and not p.is_symlink())):
        if any((where / name).exists() for name in RESUMABLE) or (where / "stage.json").is_file():
            return True
    return False


def _remove_run(out: Path, keep_dir: bool) -> None:
    """Remove what a failed new run wrote; an --out that existed (empty) before the run stays, empty."""
    if not keep_dir:
        shutil.rmtree(out, ignore_errors=True)
        return
    for entry in out.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _check_resume(out: Path) -> None:
    """--resume continues a run: --out must hold one. Temporaries a killed run left there are removed."""
    from prunedm._atomic import remove_stale_temps
    from prunedm.cli.config import RESOLVED, ConfigError

    if not (out / RESOLVED).is_file():
        state = "does not exist" if not out.exists() else "holds no run (no config.yaml)"
        raise ConfigError(f"--resume: --out {out} {state}; drop --resume to start a new run there")
    if os.environ.get("RANK", "0") == "0":  # one process cleans; the others of a torchrun job wait in _prepare
        remove_stale_temps(out)


def _cmd_job(args: argparse.Namespace) -> int:
    from prunedm.cli.commands import resolve_device
    from prunedm.cli.config import dumps, load_config
    from prunedm.cli.schema import validate_config

    config = load_config(_job_defaults(args), args.config, [*args.overrides, *_flag_overrides(args)])
    # Every key is checked, and the device found, before anything is written or loaded.
    config = validate_config(args.command, config)
    resolve_device(config["device"])
    out = Path(args.out)
    if args.resume:
        _check_resume(out)
    existed = out.exists()
    fresh = not existed or (out.is_dir() and not any(out.iterdir()))
    dist = _init_distributed(args.command, config)
    try:
        out = _prepare(args, config, dist)
        if args.command != "demo" and (dist is None or dist.get_rank() == 0):
            print(f"prunedm {args.command}: writing to {out}\n{dumps(config)}", flush=True)
        _job_runner(args.command)(config, out, args.resume)
    except Exception:
        # A new run that failed (a user's error or a bug alike) leaves nothing behind, unless it holds
        # progress that --resume can use. Ctrl-C keeps the directory: the message suggests --resume.
        if fresh and not args.resume and out.is_dir() and not _holds_progress(out):
            if dist is None or dist.get_rank() == 0:
                _remove_run(out, keep_dir=existed)
        raise
    finally:
        if dist is not None:
            dist.destroy_process_group()
    return 0


def _add_job_arguments(job: argparse.ArgumentParser, command: str, out_required: bool = True) -> None:
    from prunedm.cli.commands import FLAG_KEYS
    from prunedm.cli.schema import describe_keys

    # --help lists every config key with its default and valid range: the same table the check uses.
    job.formatter_class = argparse.RawDescriptionHelpFormatter
    job.epilog = "config keys (key = default: valid values):\n  " + "\n  ".join(describe_keys(command))

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


class UsageError(ValueError):
    """A command line argparse refuses (unknown flag, bad choice): reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    # argparse prints the usage block and exits; the CLI's rule is one line on stderr and exit code 2.
    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    """The `prunedm` argument parser: info, bench, selftest, demo and the jobs."""
    parser = _Parser(prog="prunedm", description=__doc__)
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
    selftest = sub.add_parser("selftest", help=SELFTEST_HELP, description=SELFTEST_HELP)
    selftest.add_argument("--force", action="store_true", help="test again even when a result is cached")
    selftest.set_defaults(func=_cmd_selftest)
    for name, help_text in JOBS.items():
        _add_job_arguments(sub.add_parser(name, help=help_text, description=help_text), name)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """parse_args, but key=value overrides may also come after flags (`--config f.yaml lr=1e-4`):
    argparse takes one run of positionals only, and hands later ones back as unrecognised."""
    args, extra = parser.parse_known_args(argv)
    late = [item for item in extra if "=" in item and not item.startswith("-")]
    if hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *late]
        extra = [item for item in extra if item not in late]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 600 else text[:597] + "..."


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `prunedm` console script; returns the exit code."""
    try:
        args = _parse(build_parser(), argv)
    except UsageError as exc:
        print(f"prunedm: error: {_one_line(exc)}", file=sys.stderr)
        return 2
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
