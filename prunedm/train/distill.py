"""Masked knowledge distillation (TinyFusion's Masked KD) for finetuning a pruned student from its teacher:
output KD, ground-truth loss, and the hidden states of student blocks matched to teacher blocks.

loss = kd_weight * KD(student output, teacher output) + gt_weight * MSE(student output, target)
       + beta_t * sum over matched layers of masked MSE(student features, teacher features)
Faithful by default to the paper's Masked KD: the feature term is on (beta 1e-2, decayed linearly to 0 over
feature_decay_steps when given), its elements beyond mean +/- 2 sigma (per sample) of either the student or
the teacher are zeroed on both sides (massive activations would otherwise dominate), and the output KD is
plain MSE. Deviations and why: the 0.9/0.1 split of KD and ground truth is prunedm's (a little ground truth
steadies short runs); output masking (output_mask_sigma) and the teacher-only mask (masked_mse) stay options."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from prunedm.diffusion import predict


@dataclass
class DistillConfig:
    teacher: nn.Module
    kd_weight: float = 0.9
    gt_weight: float = 0.1
    feature_weight: float = 1e-2  # beta, the paper's
    # student module name -> teacher module name whose outputs are matched (same shapes); "blocks": student
    # transformer_blocks.i against teacher transformer_blocks.keep_indices[i] (models without blocks: no term)
    feature_layers: dict[str, str] | str = "blocks"
    keep_indices: list[int] | None = None  # which teacher block each student block came from (depth pruning)
    feature_decay_steps: int | None = None  # beta decays linearly to 0 over these steps; None: constant
    mask_sigma: float | None = 2.0  # feature masking; None: plain MSE
    output_mask_sigma: float | None = None  # output KD masking (the teacher-only masked_mse); None: plain MSE


def masked_mse(student: torch.Tensor, teacher: torch.Tensor, sigma: float | None, count=None) -> torch.Tensor:
    """MSE over the elements where the teacher is within mean +/- sigma * std (per sample). `count` maps this
    batch's kept-element count to the divisor (a sharded run: the joined batch's count over the ranks)."""
    student, teacher = student.float(), teacher.float()
    if sigma is None:
        return torch.mean((student - teacher) ** 2)
    keep = within_sigma(teacher, sigma)
    kept = keep.sum().float()
    return ((student - teacher) ** 2 * keep).sum() / (kept if count is None else count(kept)).clamp_min(1)


def within_sigma(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Bool mask of the elements within mean +/- sigma * std of their sample (statistics over dims 1..)."""
    flat = x.float().reshape(x.shape[0], -1)
    mean, std = flat.mean(1, keepdim=True), flat.std(1, keepdim=True)
    return ((flat - mean).abs() <= sigma * std).reshape(x.shape)


def masked_feature_mse(student: torch.Tensor, teacher: torch.Tensor, sigma: float | None) -> torch.Tensor:
    """Masked KD's feature term: elements beyond mean +/- sigma * std of the student or of the teacher (per
    sample) are zeroed in both, then the mean squared difference over all elements."""
    student, teacher = student.float(), teacher.float()
    if sigma is None:
        return torch.mean((student - teacher) ** 2)
    keep = within_sigma(student.detach(), sigma) & within_sigma(teacher, sigma)
    return torch.mean(((student - teacher) * keep) ** 2)


def block_pairs(student: nn.Module, teacher: nn.Module, keep_indices: list[int] | None) -> dict[str, str]:
    """{student block name: teacher block name} for the 'blocks' feature layers; {} when either model has no
    transformer_blocks. ValueError when the block counts differ and keep_indices does not say how they map."""
    s_blocks, t_blocks = getattr(student, "transformer_blocks", None), getattr(teacher, "transformer_blocks", None)
    if not isinstance(s_blocks, nn.ModuleList) or not isinstance(t_blocks, nn.ModuleList):
        return {}
    if keep_indices is None:
        if len(s_blocks) != len(t_blocks):
            raise ValueError(
                f"DistillConfig.keep_indices is needed: the student has {len(s_blocks)} blocks, the teacher "
                f"{len(t_blocks)}; pass the teacher block each student block came from"
            )
        keep_indices = list(range(len(s_blocks)))
    if len(keep_indices) != len(s_blocks) or not all(0 <= i < len(t_blocks) for i in keep_indices):
        raise ValueError(
            f"DistillConfig.keep_indices must name {len(s_blocks)} teacher blocks in [0, {len(t_blocks)}), "
            f"got {keep_indices}"
        )
    return {f"transformer_blocks.{i}": f"transformer_blocks.{j}" for i, j in enumerate(keep_indices)}


class _Capture:
    """Forward hooks recording the outputs of named modules."""

    def __init__(self, model: nn.Module, names: list[str]):
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"DistillConfig.feature_layers names modules the model does not have: {missing}")
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = [modules[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name):
        def record(module, inputs, output):
            self.outputs[name] = output[0] if isinstance(output, (tuple, list)) else output

        return record

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


class DistillLoss:
    """The loss above as a callable of (model, noisy, timesteps, batch, target[, step]). Without `step`, the
    calls are counted: a resumed run should pass its step (or set .step) so beta's decay resumes too."""

    def __init__(self, config: DistillConfig, student: nn.Module):
        for name in ("kd_weight", "gt_weight", "feature_weight"):
            if getattr(config, name) < 0:
                raise ValueError(f"DistillConfig.{name} must be >= 0, got {getattr(config, name)}")
        if config.feature_decay_steps is not None and config.feature_decay_steps < 1:
            raise ValueError(f"DistillConfig.feature_decay_steps must be >= 1, got {config.feature_decay_steps}")
        if isinstance(config.feature_layers, str):
            if config.feature_layers != "blocks":
                raise ValueError(
                    f"DistillConfig.feature_layers must be a dict or 'blocks', got {config.feature_layers!r}"
                )
            pairs = block_pairs(student, config.teacher, config.keep_indices)
        else:
            pairs = dict(config.feature_layers)
        self.config, self.pairs, self.step = config, pairs, 0
        self.count = None  # masked_mse's divisor map (prunedm.parallel.finetune sets it per rank)
        config.teacher.eval().requires_grad_(False)
        self.student_capture = _Capture(student, list(pairs))
        self.teacher_capture = _Capture(config.teacher, list(pairs.values()))

    def feature_weight(self, step: int) -> float:
        """beta at `step`: feature_weight, decayed linearly to 0 over feature_decay_steps when given."""
        c = self.config
        if c.feature_decay_steps is None:
            return c.feature_weight
        return c.feature_weight * max(0.0, 1.0 - step / c.feature_decay_steps)

    def __call__(self, model, noisy, timesteps, batch, target, step: int | None = None) -> torch.Tensor:
        c = self.config
        step = self.step if step is None else step
        self.step = step + 1
        with torch.no_grad():
            teacher_out = predict(c.teacher, noisy, timesteps, batch)
        student_out = predict(model, noisy, timesteps, batch)
        loss = c.kd_weight * masked_mse(student_out, teacher_out, c.output_mask_sigma, self.count)
        loss = loss + c.gt_weight * torch.mean((student_out.float() - target.float()) ** 2)
        beta = self.feature_weight(step)
        if self.pairs and beta > 0:
            for s_name, t_name in self.pairs.items():
                s_feat = self.student_capture.outputs[s_name]
                t_feat = self.teacher_capture.outputs[t_name]
                loss = loss + beta * masked_feature_mse(s_feat, t_feat, c.mask_sigma)
        return loss

    def remove(self) -> None:
        """Detach the capture hooks from the student and the teacher."""
        self.student_capture.remove()
        self.teacher_capture.remove()
