"""Finetuning after pruning: plain noise-prediction training and masked distillation, with
EMA, mixed precision, DDP, atomic checkpoints and exact resume."""

from prunedm.train.distill import DistillConfig, masked_mse
from prunedm.train.finetune import FinetuneConfig, FinetuneResult, finetune

__all__ = ["DistillConfig", "FinetuneConfig", "FinetuneResult", "finetune", "masked_mse"]
