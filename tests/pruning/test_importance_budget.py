"""The Diff-Pruning gradient pass on a budget: batched timesteps give the paper's per-timestep losses,
stopping point and gradient; the default pass is bounded; small models run it on one thread."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from tiny_models import tiny_pruning_unet

from prunedm.pruning import accumulate_denoising_gradients, prune_channels
from prunedm.pruning.importance import MAX_TIMESTEPS, gradient_pass_threads

pytestmark = pytest.mark.usefixtures("one_thread_module")


def papers_loop(model, images, scheduler, timesteps, threshold, seed=0):
    """VainF/Diff-Pruning's ddpm_prune.py: one forward/backward per timestep, stop below thr * max loss."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(images.shape, generator=generator)
    model.zero_grad(set_to_none=True)
    losses, loss_max = [], 0.0
    for t in timesteps:
        t_batch = torch.full((images.shape[0],), t, dtype=torch.long)
        loss = F.mse_loss(model(scheduler.add_noise(images, noise, t_batch), t_batch).sample, noise)
        loss.backward()
        losses.append(loss.item())
        loss_max = max(loss_max, losses[-1])
        if threshold is not None and losses[-1] < threshold * loss_max:
            break
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return losses, grads


def count_forwards(model) -> list[int]:
    """The batch size of each forward of `model` on real tensors, in order (filled as they run)."""
    calls = []

    def record(module, args, kwargs, output):
        sample = args[0] if args else kwargs["sample"]
        if sample.device.type != "meta":  # torch-pruning counts MACs on a meta copy
            calls.append(int(sample.shape[0]))

    model.register_forward_hook(record, with_kwargs=True)
    return calls


def test_batched_timesteps_give_the_papers_losses_stop_and_gradient():
    model, scheduler = tiny_pruning_unet(), DDPMScheduler(num_train_timesteps=1000)
    images = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    timesteps = list(range(0, 1000, 37))
    # A random model's loss is flat: at 0.99 the paper's loop stops at the 13th of these 28 timesteps,
    # the third of the fifth timestep per pass (so the last pass's backward must leave two out).
    losses, grads = papers_loop(model, images, scheduler, timesteps, threshold=0.99)
    assert len(losses) == 13

    calls = count_forwards(model)
    record = accumulate_denoising_gradients(
        model, images, scheduler, threshold=0.99, timesteps=timesteps, samples_per_pass=15, max_timesteps=None
    )
    assert record.timesteps == timesteps[: len(losses)] and record.stopped_early
    torch.testing.assert_close(torch.tensor(record.losses), torch.tensor(losses), rtol=1e-5, atol=1e-7)
    assert calls == [15, 15, 15] and record.passes == 3  # 5 timesteps x 3 images per pass
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert "threshold stop at t=" in record.summary() and f"{len(losses)} timesteps" in record.summary()


def test_max_timesteps_visits_evenly_spaced_timesteps_weighted_by_the_stride():
    model, scheduler = tiny_pruning_unet(), DDPMScheduler(num_train_timesteps=1000)
    images = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    _, grads = papers_loop(model, images, scheduler, range(0, 100, 25), threshold=None)

    record = accumulate_denoising_gradients(model, images, scheduler, timesteps=range(100), max_timesteps=4)
    assert record.timesteps == [0, 25, 50, 75] and record.stride == 25 and not record.stopped_early
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 25 * grads[name], rtol=1e-4, atol=1e-5, msg=name)
    with pytest.raises(ValueError, match="max_timesteps must be at least 1"):
        accumulate_denoising_gradients(model, images, scheduler, max_timesteps=0)


def test_default_diff_pruning_pass_is_bounded_and_says_what_it_used():
    # Before: one forward/backward per timestep, up to all 1000 of the schedule (54 s for the demo's
    # model when the machine is quiet, 750-1082 s under load). Now at most MAX_TIMESTEPS timesteps,
    # several per pass. A threshold of 0 never stops, so this is the longest pass there is.
    model = tiny_pruning_unet()
    calls = count_forwards(model)
    report = prune_channels(model, "diff-pruning", 0.5, data=[torch.randn(4, 3, 8, 8)], threshold=0.0)
    gradient_pass = report.gradient_pass
    assert gradient_pass.timesteps == list(range(0, 1000, 1000 // MAX_TIMESTEPS))
    training_forwards = [n for n in calls if n > 1]  # batch-1 calls are torch-pruning's tracing
    assert len(training_forwards) == gradient_pass.passes <= 2 and sum(training_forwards) == 4 * MAX_TIMESTEPS
    assert f"{MAX_TIMESTEPS} timesteps (every 10th timestep" in report.summary()


def test_small_models_run_the_pass_on_one_thread_and_the_count_is_restored():
    model = tiny_pruning_unet()
    assert gradient_pass_threads(model, torch.device("cpu")) == 1
    assert gradient_pass_threads(model, torch.device("cuda")) is None
    threads_seen = []
    model.register_forward_hook(lambda *_: threads_seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        record = accumulate_denoising_gradients(model, torch.randn(2, 3, 8, 8), timesteps=range(0, 1000, 100))
    finally:
        torch.set_num_threads(before)
    assert threads_seen == [1] * record.passes and record.threads == 1
