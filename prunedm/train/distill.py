"""Masked knowledge distillation (TinyFusion-style) for finetuning a pruned student from its teacher.

loss = kd_weight * KD(student, teacher outputs) + gt_weight * MSE(student, target)
       + feature_weight * sum over chosen layers of KD(student features, teacher features),
where each KD term ignores elements at which the teacher's activation lies outside mean +/- k sigma
(massive activations that would otherwise dominate the loss)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class DistillConfig:
    teacher: nn.Module
    kd_weight: float = 0.9
    gt_weight: float = 0.1
    feature_weight: float = 0.0  # beta
    # student module name -> teacher module name whose outputs are matched (same shapes)
    feature_layers: dict[str, str] = field(default_factory=dict)
    mask_sigma: float | None = 2.0  # None: no masking


def masked_mse(student: torch.Tensor, teacher: torch.Tensor, sigma: float | None) -> torch.Tensor:
    """MSE over the elements where the teacher is within mean +/- sigma * std (per sample)."""
    student, teacher = student.float(), teacher.float()
    if sigma is None:
        return torch.mean((student - teacher) ** 2)
    flat = teacher.reshape(teacher.shape[0], -1)
    mean = flat.mean(1, keepdim=True)
    std = flat.std(1, keepdim=True)
    keep = ((flat - mean).abs() <= sigma * std).reshape(teacher.shape)
    return ((student - teacher) ** 2 * keep).sum() / keep.sum().clamp_min(1)


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
            self.outputs[name] = output[0] if isinstance(output, tuple) else output

        return record


class DistillLoss:
    def __init__(self, config: DistillConfig, student: nn.Module):
        for name in ("kd_weight", "gt_weight", "feature_weight"):
            if getattr(config, name) < 0:
                raise ValueError(f"DistillConfig.{name} must be >= 0, got {getattr(config, name)}")
        self.config = config
        config.teacher.eval().requires_grad_(False)
        self.student_capture = _Capture(student, list(config.feature_layers))
        self.teacher_capture = _Capture(config.teacher, list(config.feature_layers.values()))

    def __call__(self, model, noisy, timesteps, batch, target) -> torch.Tensor:
        from prunedm.train.finetune import predict

        c = self.config
        with torch.no_grad():
            teacher_out = predict(c.teacher, noisy, timesteps, batch)
        student_out = predict(model, noisy, timesteps, batch)
        loss = c.kd_weight * masked_mse(student_out, teacher_out, c.mask_sigma)
        loss = loss + c.gt_weight * torch.mean((student_out.float() - target.float()) ** 2)
        if c.feature_layers and c.feature_weight > 0:
            for s_name, t_name in c.feature_layers.items():
                s_feat = self.student_capture.outputs[s_name]
                t_feat = self.teacher_capture.outputs[t_name]
                loss = loss + c.feature_weight * masked_mse(s_feat, t_feat, c.mask_sigma)
        return loss
