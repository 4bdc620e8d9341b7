"""`prunedm prune method=depth`: whole blocks of a DiT-style transformer removed, either chosen (depth.keep, or
every depth.every-th) or learned by TinyFusion (depth.learn=tinyfusion), in one process or under torchrun
(parallel=fsdp: the model sharded per block; ddp: whole on every rank); either equals one process's search on the
joined batch."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from prunedm._atomic import write_text_atomic
from prunedm.cli.config import ConfigError
from prunedm.cli.models import load_model
from prunedm.cli.pipeline import conditioned_data, training_scheduler
from prunedm.parallel import fsdp
from prunedm.pruning.depth import keep_every, prune_depth
from prunedm.pruning.tinyfusion import learn_depth_keep
from prunedm.serialization import save_pretrained
from prunedm.train.finetune import StepSampler

CHECKPOINTS = "checkpoints"  # under --out: the search's checkpoints, which --resume continues


class StepBatches(Sequence):
    """Batch `step` of a search: the joined batch of StepSampler(seed) (batch_size images of `data`), of which
    rank r takes rows [r * n, (r + 1) * n), n = batch_size / world: the rows the keyed loss expects it to hold."""

    def __init__(self, data, steps: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.data, self.steps, self.rank, self.rows = data, steps, rank, batch_size // world
        self.sampler = StepSampler(len(data), batch_size, seed)

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int):
        if not 0 <= step < self.steps:
            raise IndexError(step)
        indices = self.sampler.indices(step)[self.rank * self.rows : (self.rank + 1) * self.rows]
        return self.data[indices.to(self.data.device)]


def run_prune_depth(config: dict, out: Path, resume: bool, model, device: torch.device) -> dict:
    """Remove blocks of `model` (chosen, or learned by TinyFusion); writes model/ and report.json (rank 0)."""
    blocks = getattr(model, "transformer_blocks", None)
    if blocks is None:
        raise ConfigError(f"method=depth needs a transformer with transformer_blocks; {type(model).__name__} has none")
    d = config["depth"]
    rank, world = (torch.distributed.get_rank(), fsdp.world_size()) if fsdp.world_size() > 1 else (0, 1)
    if d["learn"] is None:
        if world > 1:
            raise ConfigError("prune method=depth runs in one process unless it learns: set depth.learn=tinyfusion "
                              "parallel=fsdp under torchrun")  # fmt: skip
        keep = d["keep"] or keep_every(len(blocks), d["every"])
        summary = {"kept_blocks": list(keep), "blocks_before": len(blocks)}
    else:
        if d["keep"] is not None:
            raise ConfigError("depth.keep and depth.learn=tinyfusion exclude each other: drop depth.keep to learn it")
        summary = _learn(config, out, resume, model, device, rank, world)
        keep = summary["kept_blocks"]
        if config["parallel"] == "fsdp" and world > 1:  # the model stayed sharded: rank 0 prunes a fresh copy
            model = load_model(config["model"], config["seed"]) if rank == 0 else None
    if rank == 0:
        prune_depth(model, keep)
        save_pretrained(model.cpu(), out / "model")
        write_text_atomic(out / "report.json", json.dumps(summary, indent=1) + "\n")
        print(f"kept blocks {list(keep)} of {len(blocks)}; pruned model saved to {out / 'model'}")
    return summary


def _learn(config: dict, out: Path, resume: bool, model, device, rank: int, world: int) -> dict:
    """TinyFusion's search on the job's data; the report's summary (kept blocks, logits, decision, losses)."""
    d = config["depth"]
    if d["group_size"] < 2 or d["keep_per_group"] >= d["group_size"]:
        raise ConfigError(f"depth.group_size={d['group_size']}, depth.keep_per_group={d['keep_per_group']}: "
                          "need 1 <= keep_per_group < group_size")  # fmt: skip
    if len(model.transformer_blocks) % d["group_size"]:
        raise ConfigError(f"depth.group_size={d['group_size']}: {len(model.transformer_blocks)} blocks do not split "
                          "into groups of that size")  # fmt: skip
    sharded = config["parallel"] == "fsdp"
    if d["batch_size"] % world:  # the ranks' mean losses and gradients are the joined batch's for equal shares
        raise ConfigError(f"parallel={config['parallel']} needs depth.batch_size a multiple of {world} (the ranks), "
                          f"got {d['batch_size']}")  # fmt: skip
    _, data = conditioned_data({**config, "data": d["data"], "cond_dropout": 0.0}, model, device)
    if len(data) < d["batch_size"]:
        raise ConfigError(f"depth.data={d['data']}: {len(data)} images, fewer than depth.batch_size={d['batch_size']}")
    batches = StepBatches(data.to(device), d["steps"], d["batch_size"], config["seed"], rank, world)
    every = max(1, d["steps"] // 10)

    def progress(done: int, loss: float) -> None:
        if rank == 0 and (done % every == 0 or done == d["steps"]):
            print(f"depth search ({d['preset']}): step {done}/{d['steps']} loss {loss:.5f}", flush=True)

    result = learn_depth_keep(
        model, batches, d["group_size"], d["keep_per_group"], d["steps"], preset=d["preset"],
        logits_lr=d["logits_lr"], seed=config["seed"], shard=sharded and world > 1,
        data_parallel=not sharded and world > 1,
        scheduler=training_scheduler(config, model), checkpoint_dir=out / CHECKPOINTS,
        checkpoint_every=d["checkpoint_every"], resume=resume, on_step=progress,
    )  # fmt: skip
    search = {"preset": d["preset"], "group_size": d["group_size"], "keep_per_group": d["keep_per_group"],
              "steps": d["steps"], "batch_size": d["batch_size"], "parallel": config["parallel"], "world_size": world,
              "logits": result.logits.tolist(), "decision_logits": result.decision_logits.tolist(),
              "probabilities": result.probabilities.tolist(), "losses": result.losses}  # fmt: skip
    return {"kept_blocks": result.keep_indices, "blocks_before": len(model.transformer_blocks), "tinyfusion": search}
