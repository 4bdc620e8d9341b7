"""Masked KD for `prunedm finetune` (distill.teacher=...): the teacher loaded and checked against the student's
block layout with one probe forward, prunedm.train's DistillConfig built from the distill.* keys, and what
report.json records of it. The loss itself is prunedm.train.distill's (DDP) and prunedm.parallel's (FSDP)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from prunedm.cli.config import RESOLVED, ConfigError, read_resolved
from prunedm.cli.models import load_model
from prunedm.cli.schema import DISTILL_WEIGHTS
from prunedm.diffusion import predict, split_batch
from prunedm.train.distill import DistillConfig, DistillLoss

ORIGINAL = "original"  # distill.teacher: the model the prunedm job that wrote model= started from


def teacher_source(config: dict) -> tuple[str, list[int] | None]:
    """(the teacher's model spec, keep_indices): distill.teacher as given; for "original" the model of the prunedm
    job whose --out holds model= (its config.yaml beside model/), with the blocks a depth prune kept (its
    report.json's kept_blocks) unless distill.keep_indices is set."""
    d = config["distill"]
    if d["teacher"] != ORIGINAL:
        return d["teacher"], d["keep_indices"]
    run = Path(str(config["model"])).parent
    if not (run / RESOLVED).is_file() or not isinstance(read_resolved(run).get("model"), str):
        raise ConfigError(f"distill.teacher=original: model={config['model']} is not the model/ of a prunedm job (no "
                          f"{run / RESOLVED} naming its model): set distill.teacher=<the teacher model>")  # fmt: skip
    keep = d["keep_indices"]
    if keep is None and (run / "report.json").is_file():
        try:
            keep = json.loads((run / "report.json").read_text()).get("kept_blocks")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            raise ConfigError(f"distill.teacher=original: {run / 'report.json'} is not a job's report") from None
    return read_resolved(run)["model"], keep


def distillation(config: dict, student, data, device: torch.device) -> tuple[DistillConfig | None, dict]:
    """(the DistillConfig of config's distill.* keys with its teacher on `device`, {"distill": what report.json
    records}), or (None, {}) without distill.teacher. ConfigError, before any training, when the teacher is not
    the student's kind, its blocks do not map onto the student's, or their outputs differ in shape."""
    d = config["distill"]
    if d["teacher"] is None:
        return None, {}
    if config["cond_dropout"]:
        raise ConfigError(f"cond_dropout={config['cond_dropout']} with distill.teacher: the teacher would see the "
                          "captions or classes the student's dropout removes; set cond_dropout=0")  # fmt: skip
    spec, keep = teacher_source(config)
    teacher = load_model(spec).to(device)
    where = f"distill.teacher={d['teacher']}" + (f" ({spec})" if spec != d["teacher"] else "")
    if type(teacher).__name__ != type(student).__name__:
        raise ConfigError(f"{where}: a {type(teacher).__name__} cannot teach the {type(student).__name__} (the "
                          "teacher is the model the student was pruned from)")  # fmt: skip
    settings = DistillConfig(teacher=teacher, keep_indices=keep, **{k: d[k] for k in DISTILL_WEIGHTS})
    pairs = _check_layout(settings, student, data, device, where)
    summary = {"teacher": spec, **{k: d[k] for k in DISTILL_WEIGHTS}, "keep_indices": keep, "feature_pairs": len(pairs)}
    return settings, {"distill": summary}


def _check_layout(settings: DistillConfig, student, data, device: torch.device, where: str) -> dict[str, str]:
    """The matched {student block: teacher block}, after one forward of both on the first training sample shows
    every matched output (and the prediction) alike in shape."""
    try:
        loss = DistillLoss(settings, student)
    except ValueError as exc:
        message = str(exc).replace("DistillConfig.", "distill.").replace("pass the teacher", "list the teacher")
        raise ConfigError(f"{where}: {message}") from None
    modes = student.training, settings.teacher.training
    images, cond = split_batch(data[:1])
    images, cond = images.to(device), {k: v.to(device) for k, v in cond.items()}
    timesteps = torch.full((1,), 500, device=device)
    try:
        student.eval()
        with torch.no_grad():
            shapes = [(predict(m, images, timesteps, cond).shape, m) for m in (student, settings.teacher)]
    except RuntimeError as exc:
        raise ConfigError(f"{where}: the teacher does not run on the student's inputs ({exc})") from None
    finally:
        student.train(modes[0])
        settings.teacher.train(modes[1])
        loss.remove()
    problems = [] if shapes[0][0] == shapes[1][0] else [f"prediction {list(shapes[1][0])} != {list(shapes[0][0])}"]
    for s_name, t_name in loss.pairs.items():
        s_out, t_out = loss.student_capture.outputs[s_name], loss.teacher_capture.outputs[t_name]
        if s_out.shape != t_out.shape:
            problems.append(f"{t_name} {list(t_out.shape)} != student {s_name} {list(s_out.shape)}")
    if problems:
        raise ConfigError(f"{where}: the teacher's outputs do not match the student's: {'; '.join(problems)}")
    return loss.pairs
