"""The mask learners' named presets (official constants by default, short-budget ones beside them): MaskPro's
baselines, advantage scaling, budget-chosen init and flip report; MaskLLM's graded prior, regulariser, soft masks."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunedm
from prunedm import masks as pm
from prunedm import ops

pytestmark = [
    pytest.mark.skipif(not prunedm.extension_info()["cpu"]["usable"], reason="extension not built"),
    pytest.mark.usefixtures("one_thread_module"),
]

DIGITS_DDPM = Path(prunedm.__file__).parent / "assets" / "digits-ddpm"


def mse(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)


def linear_task(d_in=16, d_out=8, seed=0):
    torch.manual_seed(seed)
    model = nn.Linear(d_in, d_out)
    x = torch.randn(64, d_in)
    with torch.no_grad():
        return model, (x, model(x))


# MaskPro -----------------------------------------------------------------------------------------


def test_maskpro_presets_and_default_is_official():
    model, _ = linear_task()
    official = pm.MaskProLearner(copy.deepcopy(model), mse)
    assert (official.preset, official.samples, official.baseline_kind, official.baseline_decay) == (
        "official",
        1,
        "ema",
        0.99,
    )
    assert official.logit_init == 10.0 and official.mask_lr == 50.0 and not official.normalize_advantage
    short = pm.MaskProLearner(copy.deepcopy(model), mse, preset="short", total_steps=100)
    assert (short.samples, short.baseline_kind, short.normalize_advantage, short.mask_lr) == (4, "loo", True, 1.0)
    assert short.logit_init == pytest.approx(pm.logit_init_for_budget(100, 4))
    # Explicit options win over the preset's.
    assert pm.MaskProLearner(copy.deepcopy(model), mse, preset="short", logit_init=6.0).logit_init == 6.0
    for kwargs, words in [({"preset": "fast"}, "preset must be one of"),
                          ({"preset": "short"}, "logit_init 'budget' needs total_steps"),
                          ({"baseline": "loo"}, "needs samples >= 2"),
                          ({"baseline": "mean"}, "baseline must be one of"),
                          ({"samples": 0}, "samples must be an integer >= 1"),
                          ({"logit_init": -1.0}, "logit_init must be a positive number")]:  # fmt: skip
        with pytest.raises(ValueError, match=words):
            pm.MaskProLearner(copy.deepcopy(model), mse, **kwargs)


def test_leave_probability_and_budget_init():
    # Kept logits L, pruned 0: a draw leaves the set with probability ~3 e^-L (issue 15: never, at L = 10).
    assert pm.leave_probability(10.0) == pytest.approx(3 * math.exp(-10), rel=0.1)
    assert pm.leave_probability(0.0) == pytest.approx(5 / 6, rel=1e-4)  # uniform: 1 of 6 sets stays
    init = pm.logit_init_for_budget(100, 4)
    assert 4.0 < init < 5.0  # the working range for K = 4 at 100 steps
    assert pm.leave_probability(init) * 400 == pytest.approx(16.0, rel=1e-3)  # 16 draws off the set per group
    assert pm.logit_init_for_budget(10_000, 1) > pm.logit_init_for_budget(1000, 1) > pm.logit_init_for_budget(300, 1)
    assert pm.logit_init_for_budget(1, 1) == 3.0 and pm.logit_init_for_budget(10**9, 1) == 10.0  # clamped
    with pytest.raises(ValueError, match="total_steps and samples must be >= 1"):
        pm.logit_init_for_budget(0)


def test_maskpro_leave_one_out_and_corrected_baselines():
    model, _ = linear_task()
    loo = pm.MaskProLearner(copy.deepcopy(model), mse, samples=3, baseline="loo")
    assert loo._advantages([1.0, 2.0, 3.0], None) == pytest.approx([-1.5, 0.0, 1.5])

    ema = pm.MaskProLearner(copy.deepcopy(model), mse, baseline="ema-corrected", baseline_decay=0.9)
    assert ema._advantages([1.2], 1.0) == pytest.approx([0.0])  # corrected: the first baseline is the delta itself
    ema.step_count = 1
    # b = 0.9 * 0.02 + 0.1 * 0.4 = 0.058, corrected by 1 - 0.9^2 = 0.19.
    assert ema._advantages([1.4], 1.0) == pytest.approx([0.4 - 0.058 / 0.19])
    plain = pm.MaskProLearner(copy.deepcopy(model), mse, baseline="ema", baseline_decay=0.9)
    assert plain._advantages([1.2], 1.0) == pytest.approx([0.2 - 0.02])  # the official, uncorrected EMA

    normalized = pm.MaskProLearner(copy.deepcopy(model), mse, samples=2, baseline="loo", normalize_advantage=True,
                                   baseline_decay=0.5)  # fmt: skip
    assert normalized._advantages([1.0, 3.0], None) == pytest.approx([-1.0, 1.0])  # RMS 2 -> +-1
    normalized.step_count = 1
    # Mean squares 4 then 1: EMA 0.5 * 2 + 0.5 * 1 = 1.5, corrected by 1 - 0.25: RMS sqrt(2).
    assert normalized._advantages([1.0, 2.0], None) == pytest.approx([-1 / math.sqrt(2), 1 / math.sqrt(2)])


def test_maskpro_samples_share_noise_and_timesteps():
    model, (x, _) = linear_task()
    draws = []

    def noisy(model, batch):
        noise = torch.randn(batch.shape)
        draws.append(noise)
        return (model(batch + noise) ** 2).mean()

    learner = pm.MaskProLearner(model, noisy, samples=4, baseline="loo", logit_init=1.0)
    learner.step(x)
    assert len(draws) == 4 and all(torch.equal(d, draws[0]) for d in draws)


def test_maskpro_report_counts_flipped_groups_and_losses():
    model, batch = linear_task()
    learner = pm.MaskProLearner(model, mse)
    assert learner.report()["groups_flipped"] == 0 and learner.report()["groups"] == 8 * 16 // 4
    with torch.no_grad():  # move group 0 of row 0 off its initial set: keep its two pruned weights
        logits = learner.logits["weight" if "weight" in learner.logits else next(iter(learner.logits))]
        logits[0, :4] = (~learner.initial[next(iter(learner.initial))][0, :4]).float() * 20
    report = learner.report(batch)
    assert report["groups_flipped"] == 1 and report["flipped_fraction"] == pytest.approx(1 / 32)
    magnitude = {name: mask for name, mask in pm.magnitude_masks(learner.targets).items()}
    assert report["initial_mask_loss"] == pytest.approx(learner.loss_with_masks(batch, magnitude))
    assert report["mask_loss"] == pytest.approx(learner.loss_with_masks(batch)) and report["mask_loss"] > 0


def test_maskpro_short_preset_resumes_exactly(tmp_path):
    model, batch = linear_task(seed=3)

    def noisy(model, batch):
        x, y = batch
        return F.mse_loss(model(x + 0.3 * torch.randn_like(x)), y)

    make = lambda: pm.MaskProLearner(copy.deepcopy(model), noisy, preset="short", total_steps=6, seed=2)  # noqa: E731
    torch.manual_seed(0)
    straight = make()
    for _ in range(6):
        straight.step(batch)
    torch.manual_seed(0)
    first = make()
    for _ in range(3):
        first.step(batch)
    first.save(tmp_path / "learner.safetensors")
    torch.manual_seed(99)
    resumed = make()
    resumed.load(tmp_path / "learner.safetensors")
    for _ in range(3):
        resumed.step(batch)
    for name, logits in straight.logits.items():
        assert torch.equal(resumed.logits[name], logits)
    assert resumed.advantage_square == straight.advantage_square > 0
    official = pm.MaskProLearner(copy.deepcopy(model), noisy)
    with pytest.raises(ValueError, match=r"state is from \(baseline, samples, normalize\)"):
        official.load(tmp_path / "learner.safetensors")


@pytest.mark.skipif(not (DIGITS_DDPM / "config.json").exists(), reason="digits DDPM asset missing")
def test_maskpro_short_preset_beats_magnitude_on_the_digits_ddpm():
    from diffusers import DDPMScheduler, UNet2DModel

    from prunedm.data import DigitsDataset

    scheduler = DDPMScheduler(num_train_timesteps=1000)

    def denoising_loss(model, images):
        noise = torch.randn_like(images)
        timesteps = torch.randint(0, 1000, (images.shape[0],))
        return F.mse_loss(model(scheduler.add_noise(images, noise, timesteps), timesteps).sample, noise)

    train, test = DigitsDataset("train").images, DigitsDataset("test").images[:256]

    def held_out(learner, masks=None):
        torch.manual_seed(123)  # the same noise and timesteps for every mask compared
        return sum(learner.loss_with_masks(test[i : i + 128], masks) for i in (0, 128)) / 2

    def learn(preset, steps):
        model = UNet2DModel.from_pretrained(DIGITS_DDPM).eval()
        torch.manual_seed(0)
        # The last up block's second resnet: a subset small enough for one thread, where masks matter.
        learner = pm.MaskProLearner(model, denoising_loss, preset=preset, total_steps=steps,
                                    include=r"up_blocks\.1\.resnets\.1\.", seed=0)  # fmt: skip
        g = torch.Generator().manual_seed(0)
        for _ in range(steps):
            learner.step(train[torch.randint(0, len(train), (8,), generator=g)])
        return learner

    official = learn("official", 30)
    assert official.report()["groups_flipped"] == 0  # logits 10 x mask: nothing leaves the magnitude mask
    short = learn("short", 100)
    magnitude = held_out(short, pm.magnitude_masks(short.targets))
    learned = held_out(short)
    report = short.report()
    print(f"\nMaskPro short, digits DDPM (4 layers), 100 steps: magnitude {magnitude:.4f}, learned {learned:.4f}, "
          f"{report['groups_flipped']}/{report['groups']} groups flipped")  # fmt: skip
    assert report["groups_flipped"] > 50
    assert learned < 0.95 * magnitude


# MaskLLM -----------------------------------------------------------------------------------------


def test_maskllm_presets_default_is_official():
    model, _ = linear_task()
    official = pm.MaskLLMLearner(copy.deepcopy(model), mse)
    assert official.preset == "official" and not official.hard and official.weight_reg == 1e-5
    assert official.mask_optimizer.param_groups[0]["lr"] == 5e-4
    assert (official.tau_range, official.scale_range) == ((4.0, 0.05), (1e2, 5e2))
    short = pm.MaskLLMLearner(copy.deepcopy(model), mse, preset="short")
    assert short.hard and short.weight_reg == 0.0 and short.mask_optimizer.param_groups[0]["lr"] == 5e-3
    assert "5e-2" not in (pm.MaskLLMLearner.__doc__ or "") + (pm.maskllm.__doc__ or "")
    with pytest.raises(ValueError, match="preset must be one of"):
        pm.MaskLLMLearner(copy.deepcopy(model), mse, preset="paper")
    with pytest.raises(ValueError, match="weight_reg_kind must be one of"):
        pm.MaskLLMLearner(copy.deepcopy(model), mse, weight_reg_kind="l1")


def test_maskllm_graded_prior_values_per_pattern():
    # 2:4 patterns in order (0,1) (0,2) (0,3) (1,2) (1,3) (2,3): overlap with the prior (0,1) is 2,1,1,1,1,0.
    assert pm.prior_graded(torch.tensor([0]), 2, 4).tolist() == [[2.0, 1.0, 1.0, 1.0, 1.0, 0.0]]
    assert pm.prior_graded(torch.tensor([4]), 2, 4).tolist() == [[1.0, 0.0, 1.0, 1.0, 2.0, 1.0]]  # prior (1,3)
    model, _ = linear_task()
    learner = pm.MaskLLMLearner(copy.deepcopy(model), mse, seed=7, prior_strength=3.0, init_std=0.01)
    noise = torch.randn(8, 4, 6, generator=torch.Generator().manual_seed(7)) * 0.01
    index = ops.pattern_index(pm.magnitude_masks(learner.targets)[""].float(), 2, 4)
    boost = learner.logits[""].detach() - noise
    step = 3.0 * float(noise.std())
    overlap = pm.prior_graded(index, 2, 4)
    torch.testing.assert_close(boost, (overlap - 1) * step)
    assert bool(
        (boost[overlap == 2] > 0).all() and (boost[overlap == 1] == 0).all() and (boost[overlap == 0] < 0).all()
    )


def test_maskllm_official_regulariser_value_and_decay():
    model, batch = linear_task()
    learner = pm.MaskLLMLearner(copy.deepcopy(model), mse, total_steps=10, preset="short")
    mask = pm.magnitude_masks(learner.targets)[""].float()
    kept = float((model.weight.detach() * mask).pow(2).sum())
    assert float(learner.regularization({"": mask})) == pytest.approx(-kept)
    learner.step_count = 5
    assert float(learner.regularization({"": mask})) == pytest.approx(-0.5 * kept)  # decays linearly to 0
    learner.step_count = 10
    assert float(learner.regularization({"": mask})) == 0.0
    normalized = pm.MaskLLMLearner(copy.deepcopy(model), mse, weight_reg_kind="normalized")
    total = float(model.weight.detach().pow(2).sum())
    assert float(normalized.regularization({"": mask})) == pytest.approx(1 - kept / total)
    # The official term pulls the logits toward patterns that keep large weights: its gradient is
    # -(1 - progress) * W^2 through the soft mask.
    learner.step_count = 0
    reg_only = pm.MaskLLMLearner(copy.deepcopy(model), lambda model, batch: model(batch[0]).sum() * 0, preset="short",
                                 weight_reg=1.0, total_steps=10)  # fmt: skip
    info = reg_only.step(batch)
    assert info["loss"] == 0.0 and reg_only.logits[""].grad is not None and reg_only.logits[""].grad.abs().sum() > 0


def test_maskllm_soft_and_hard_forward():
    model, (x, _) = linear_task()
    soft = pm.MaskLLMLearner(copy.deepcopy(model), mse, prior=None, init_std=1.0, scale=(1.0, 1.0), tau=(1.0, 1.0))
    matrices = soft.sample()
    mask = matrices[""].detach()
    assert bool(((mask > 0) & (mask < 1)).any())  # a mixture of patterns
    torch.testing.assert_close(mask.reshape(-1, 4).sum(-1), torch.full((32,), 2.0))
    with torch.no_grad():
        torch.testing.assert_close(soft.model(x), F.linear(x, model.weight * mask, model.bias))
    hard = pm.MaskLLMLearner(copy.deepcopy(model), mse, prior=None, init_std=1.0, scale=(1.0, 1.0), tau=(1.0, 1.0),
                             hard=True)  # fmt: skip
    hard_mask = hard.sample()[""].detach()
    assert set(hard_mask.unique().tolist()) <= {0.0, 1.0} and bool((hard_mask.reshape(-1, 4).sum(-1) == 2).all())
    with torch.no_grad():
        torch.testing.assert_close(hard.model(x), F.linear(x, model.weight * hard_mask, model.bias))
    # Both train the logits, and the final masks are exact 2:4 either way.
    for learner in (soft, hard):
        learner._set_matrix_masks(None)
        learner.step((x, torch.zeros(64, 8)))
        final = learner.masks()[""]
        assert final.dtype == torch.bool and bool((final.reshape(-1, 4).sum(-1) == 2).all())
