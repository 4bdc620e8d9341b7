"""The one mask-learning loop (the CLI's learn-mask and bench.quality): a learner's steps over batches drawn
as a pure function of the step, so a learner restored from its checkpoint continues exactly."""

from __future__ import annotations

from typing import Any, Callable

from tqdm.auto import tqdm

from prunedm.train.finetune import StepSampler


def learn_mask_steps(
    learner,
    data,
    steps: int,
    batch_size: int,
    seed: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    on_step: Callable[[int, dict], Any] | None = None,
    progress: bool = True,
    desc: str = "learn-mask",
) -> None:
    """learner.step() from learner.step_count up to `steps` on batches of `data` (a tensor of images, or any
    object indexed by a tensor of indices, e.g. images with their conditioning); on_step(done, info) after each."""
    sampler = StepSampler(len(data), batch_size, seed, rank, world_size)
    device = getattr(data, "device", None)
    for step in tqdm(range(learner.step_count, steps), desc=desc, disable=not progress, leave=False):
        indices = sampler.indices(step)
        info = learner.step(data[indices if device is None else indices.to(device)])
        if on_step is not None:
            on_step(step + 1, info)
