"""Channel pruning: the Diff-Pruning structure on the real ddpm-cifar10 architecture, the width rule,
importance-ordered selection, the gradient pass, and diffusers models that still work afterwards."""

from __future__ import annotations

import pytest
import torch
import torch_pruning as tp
from diffusers import UNet2DModel
from tiny_models import tiny_conditional_unet, tiny_pruning_unet
from torch import nn

import prunedm
from prunedm.architectures import build
from prunedm.pruning import default_example_inputs, kept_channels, make_importance, prune_channels


def ddpm_cifar10() -> UNet2DModel:
    """google/ddpm-cifar10-32's architecture (its config.json), randomly initialised."""
    return build("ddpm-cifar10-32", seed=0).eval()


def assert_diffusers_consistent(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if isinstance(module, nn.GroupNorm):
            assert module.num_channels % module.num_groups == 0, name
            assert module.weight.shape == (module.num_channels,), name
        kind = type(module).__name__
        if kind in ("Upsample2D", "Downsample2D"):
            assert (module.channels, module.out_channels) == (module.conv.in_channels, module.conv.out_channels), name
        if kind == "ResnetBlock2D":
            assert (module.in_channels, module.out_channels) == (module.conv1.in_channels, module.conv2.out_channels)
        if kind == "Attention":
            assert module.inner_dim == module.to_q.out_features and module.to_q.out_features % module.heads == 0
            assert module.to_k.out_features == module.to_q.out_features == module.to_out[0].in_features


def test_ddpm_cifar10_at_ratio_0_3_has_the_diff_pruning_papers_structure():
    model = ddpm_cifar10()
    report = prune_channels(model, "magnitude", ratio=0.3, rounding="diff-pruning", round_to=None)

    # Dense: 35.75M params, 6.06G MACs at batch 1, 32x32 (the paper's table).
    assert report.params_before == 35_746_307
    assert report.macs_before == pytest.approx(6.064e9, rel=1e-3)
    # Diff-Pruning, ratio 0.3: 19.85M params, 3.39G MACs (within 1%).
    assert report.params_after == pytest.approx(19.85e6, rel=0.01)
    assert report.macs_after == pytest.approx(3.39e9, rel=0.01)
    assert report.params_after == 19_851_157  # exactly the widths below

    # GroupNorm-coupled groups lose whole channels per group of 4 (128) or 8 (256): 25% each.
    assert model.conv_in.out_channels == 96
    assert model.down_blocks[1].resnets[0].conv2.out_channels == 192
    assert model.down_blocks[0].resnets[0].conv1.out_channels == 96
    # Groups without a GroupNorm lose int(C * 0.7): time embedding 512 -> 358, attention 256 -> 179.
    assert model.time_embedding.linear_1.out_features == 358
    assert model.down_blocks[1].attentions[0].to_q.out_features == 179
    assert model.up_blocks[1].resnets[2].conv2.out_channels == 179  # feeds only the upsampler
    assert model.conv_out.out_channels == 3
    assert report.changed_layers["conv_in"] == ((3, 128), (3, 96))
    assert report.config_updates == {"block_out_channels": (96, 192, 192, 192), "time_embedding_dim": 358}
    assert model.config.block_out_channels == (96, 192, 192, 192)

    assert_diffusers_consistent(model)
    out = model(torch.randn(1, 3, 32, 32), torch.tensor([900])).sample
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("channels", "ratio", "groups", "rounding", "round_to", "kept"),
    [
        (128, 0.3, 32, "diff-pruning", None, 96),  # removes int(38.4) -> 39, 1 per group of 4
        (256, 0.3, 32, "diff-pruning", None, 192),
        (512, 0.3, 1, "diff-pruning", None, 358),
        (256, 0.5, 32, "diff-pruning", None, 128),
        (128, 0.3, 32, "per-group", None, 64),  # torch-pruning >= 1.4.1: int(4 * 0.7) = 2 of 4
        (256, 0.3, 32, "per-group", None, 160),
        (512, 0.3, 1, "diff-pruning", 8, 352),
        (256, 0.3, 32, "diff-pruning", 128, 128),
        (64, 0.0, 8, "diff-pruning", None, 64),
    ],
)
def test_kept_channels(channels, ratio, groups, rounding, round_to, kept):
    assert kept_channels(channels, ratio, groups, rounding, round_to) == kept


def test_each_groupnorm_group_loses_its_lowest_scored_channels():
    model = tiny_pruning_unet()
    inputs = default_example_inputs(model)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=inputs)
    group = graph.get_pruning_group(model.conv_in, tp.prune_conv_out_channels, list(range(16)))
    scores = make_importance("l2")(group)
    # 16 channels in 4 GroupNorm groups of 4; ratio 0.5 keeps 2 per group: the 2 highest scored.
    expected = sorted((scores.view(4, 4).argsort(dim=1)[:, 2:] + torch.arange(4).unsqueeze(1) * 4).flatten().tolist())
    weight = model.conv_in.weight.detach().clone()

    prune_channels(model, "l2", ratio=0.5, example_inputs=inputs)

    assert model.conv_in.out_channels == 8
    torch.testing.assert_close(model.conv_in.weight, weight[expected], rtol=0, atol=0)
    assert_diffusers_consistent(model)


def test_diff_pruning_stops_the_gradient_pass_below_threshold_of_max_loss():
    model = tiny_pruning_unet()
    data = [torch.randn(2, 3, 8, 8)]
    timesteps = range(0, 1000, 125)
    report = prune_channels(model, "diff-pruning", 0.5, data=data, timesteps=timesteps, threshold=0.98)
    gradient_pass = report.gradient_pass
    losses = gradient_pass.losses
    assert gradient_pass.timesteps == list(timesteps)[: len(losses)]
    running_max = [max(losses[: i + 1]) for i in range(len(losses))]
    assert all(loss >= 0.98 * peak for loss, peak in zip(losses[:-1], running_max[:-1]))
    if gradient_pass.stopped_early:
        assert losses[-1] < 0.98 * running_max[-1]
    else:
        assert len(losses) == len(timesteps)
    assert report.params_after < report.params_before
    assert all(p.grad is None for p in model.parameters())

    # Plain Taylor visits every timestep.
    model = tiny_pruning_unet()
    report = prune_channels(model, "taylor", 0.5, data=data, timesteps=range(0, 1000, 400))
    assert report.gradient_pass.timesteps == [0, 400, 800] and not report.gradient_pass.stopped_early
    assert model(torch.randn(1, 3, 8, 8), 3).sample.shape == (1, 3, 8, 8)


@pytest.mark.parametrize("importance", ["random", "magnitude", "l1"])
def test_data_free_importances_prune_to_the_same_widths(importance):
    model = tiny_pruning_unet()
    report = prune_channels(model, importance, 0.5)
    assert report.importance == importance
    assert model.conv_in.out_channels == 8 and report.params_after < report.params_before / 3
    assert_diffusers_consistent(model)
    assert model(torch.randn(2, 3, 8, 8), torch.tensor([1, 2])).sample.shape == (2, 3, 8, 8)


def test_random_importance_is_seeded_and_leaves_the_global_generator_alone():
    first, second = tiny_pruning_unet(), tiny_pruning_unet()
    rng = torch.random.get_rng_state()
    prune_channels(first, "random", 0.5, seed=3)
    assert torch.equal(torch.random.get_rng_state(), rng)
    prune_channels(second, "random", 0.5, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


def test_conditional_unet_keeps_heads_and_geglu_halves_paired():
    model = tiny_conditional_unet()
    block = model.down_blocks[0].attentions[0].transformer_blocks[0]
    old_bias = block.ff.net[0].proj.bias.detach().clone()  # 2 x 128: value half, gate half

    report = prune_channels(model, "l1", 0.5)

    assert block.attn1.heads == 4 and block.attn1.to_q.out_features == 16  # head dim 8 -> 4
    assert block.attn2.to_k.in_features == 16  # the text width is an input: untouched
    proj, out = block.ff.net[0].proj, block.ff.net[2]
    assert proj.out_features == 2 * out.in_features == 128
    original = [int((old_bias == b).nonzero()) for b in proj.bias.detach()]
    half = out.in_features
    assert [i + 128 for i in original[:half]] == original[half:]  # unit i keeps value and gate rows
    assert report.config_updates == {"block_out_channels": (16, 32)}
    assert_diffusers_consistent(model)
    sample = model(torch.randn(2, 4, 8, 8), torch.tensor([1, 999]), encoder_hidden_states=torch.randn(2, 3, 16))
    assert sample.sample.shape == (2, 4, 8, 8)


def test_ratio_zero_changes_nothing_and_bad_arguments_raise():
    model = tiny_pruning_unet()
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([7])
    before = model(x, t).sample
    report = prune_channels(model, "magnitude", 0.0)
    assert report.params_after == report.params_before and not report.changed_layers
    torch.testing.assert_close(model(x, t).sample, before, rtol=0, atol=0)

    with pytest.raises(ValueError, match="ratio"):
        prune_channels(model, "magnitude", 1.0)
    with pytest.raises(ValueError, match="importance"):
        prune_channels(model, "hessian-ish", 0.3)
    with pytest.raises(ValueError, match="needs data"):
        prune_channels(model, "diff-pruning", 0.3)
    with pytest.raises(ValueError, match="rounding"):
        prune_channels(model, "magnitude", 0.3, rounding="nearest")


def test_ignored_layers_keep_their_outputs():
    model = tiny_pruning_unet()
    prune_channels(model, "magnitude", 0.5, ignored_layers=[model.time_embedding.linear_1])
    assert model.time_embedding.linear_1.out_features == 64
    assert model.time_embedding.linear_2.out_features == 32


def quickstart_unet() -> UNet2DModel:
    """README.md's quickstart UNet."""
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=16,
        block_out_channels=(32, 64),
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ).eval()


def eligible_layers(model: nn.Module) -> set[str]:
    from prunedm.nn.sparsify import ineligible_reason

    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    return {name for name, module in layers.items() if ineligible_reason(module) is None}


def test_quickstart_pruned_at_0_3_then_sparsified_converts_every_layer_eligible_before_pruning():
    from prunedm import sparsify

    eligible = eligible_layers(quickstart_unet())
    assert len(eligible) == 71  # of 73: conv_in (Cin 3) and conv_out (Cin 32, padding to 32 rows saves nothing)

    model = quickstart_unet()
    report = prune_channels(model, importance="magnitude", ratio=0.3)  # the README's call, defaults
    assert report.round_to == 8 and report.params_after < 0.75 * report.params_before
    assert model.time_embedding.linear_1.out_features == 88  # 128 * 0.7 = 89.6 -> 89 -> 88
    assert {n for n in report.changed_layers} and all(
        a[0] % 8 == 0 for b, a in report.changed_layers.values() if a[0] != b[0]
    )
    converted = {layer.name for layer in sparsify(model).converted}
    assert converted == eligible

    # Without the 2:4 rounding the time embedding is 89 wide: every time_emb_proj (in_features 89) stays dense.
    exact = quickstart_unet()
    prune_channels(exact, importance="magnitude", ratio=0.3, round_to=None)
    assert exact.time_embedding.linear_1.out_features == 89
    lost = eligible - {layer.name for layer in sparsify(exact).converted}
    assert len(lost) == 13 and {name.rsplit(".", 1)[-1] for name in lost} == {"time_emb_proj", "linear_2"}


def test_ddpm_cifar10_default_widths_are_the_paper_rule_rounded_down_to_2_4_multiples():
    model = ddpm_cifar10()
    report = prune_channels(model, "magnitude", ratio=0.3)
    assert report.round_to == 8 and report.rounding == "diff-pruning"
    assert model.conv_in.out_channels == 96  # already a multiple of 8 (and of its 32 GroupNorm groups)
    assert model.time_embedding.linear_1.out_features == 352  # 358 -> 352
    assert model.down_blocks[1].attentions[0].to_q.out_features == 176  # 179 -> 176
    for name, ((_, out_before), (_, out_after)) in report.changed_layers.items():
        assert out_after % 8 == 0 or out_after == out_before, name
    assert report.params_after == pytest.approx(19.7e6, rel=0.01)  # a hair under the paper's 19.85M


def test_conditional_unet_transformer_widths_stay_2_4_eligible():
    model = tiny_conditional_unet()
    prune_channels(model, "l1", 0.3)
    block = model.down_blocks[0].attentions[0].transformer_blocks[0]
    # The transformer's residual width: 32 * 0.7 = 22.4 -> 22 by the paper's rule, 16 rounded down to a multiple
    # of 8; attention (4 heads of 8): 2 per head go, 24 stay; feed-forward 128 * 0.7 = 89.6 -> 89 -> 88.
    assert block.attn1.to_q.in_features == 16 and block.attn1.to_q.out_features == 24 and block.attn1.heads == 4
    assert block.ff.net[2].in_features == 88
    widths = [m.in_features for m in model.modules() if isinstance(m, nn.Linear)]
    widths += [m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d) and m.in_channels > 4]
    assert all(w % 8 == 0 for w in widths), widths
    assert model(torch.randn(1, 4, 8, 8), 5, encoder_hidden_states=torch.randn(1, 3, 16)).sample.shape == (1, 4, 8, 8)

    exact = tiny_conditional_unet()
    prune_channels(exact, "l1", 0.3, round_to=None)
    block = exact.down_blocks[0].attentions[0].transformer_blocks[0]
    assert block.attn1.to_q.in_features == 22 and block.ff.net[2].in_features == 89  # neither can be 2:4
    skipped = {s.name: s.reason for s in prunedm.sparsify(exact, backend="dense").skipped}
    reason = skipped["down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"]
    assert "in_features=89" in reason and "width chosen by prune_channels(ratio=0.3" in reason
    assert "round_to='2:4'" in reason


def test_round_to_values_and_the_width_origin_mark():
    from prunedm.pruning import WIDTH_ORIGIN_ATTR, resolve_round_to

    assert resolve_round_to("2:4") == 8 and resolve_round_to(16) == 16 and resolve_round_to(None) is None
    for bad in ("1:4", 0, -8, True, 2.5):
        with pytest.raises(ValueError, match="round_to"):
            prune_channels(tiny_pruning_unet(), "magnitude", 0.3, round_to=bad)
    model = tiny_pruning_unet()
    report = prune_channels(model, "magnitude", 0.5, round_to=16)
    assert report.round_to == 16 and model.conv_in.out_channels == 16  # 16 of 16: 8 would not be a multiple
    assert model.time_embedding.linear_1.out_features == 32
    marked = {n for n, m in model.named_modules() if hasattr(m, WIDTH_ORIGIN_ATTR)}
    assert marked == set(report.changed_layers) and "time_embedding.linear_1" in marked
    assert getattr(model.time_embedding.linear_1, WIDTH_ORIGIN_ATTR) == (
        "prune_channels(ratio=0.5, rounding='diff-pruning', round_to=16)"
    )


def test_example_inputs_that_cannot_be_derived_say_pass_example_inputs():
    model = tiny_pruning_unet()
    model.register_to_config(sample_size=None)
    with pytest.raises(ValueError, match="pass example_inputs"):
        prune_channels(model, "magnitude", 0.3)
    report = prune_channels(model, "magnitude", 0.5, example_inputs={"sample": torch.randn(1, 3, 8, 8), "timestep": 1})
    assert model.conv_in.out_channels == 8 and report.params_after < report.params_before
