"""Channel pruning of diffusers UNets (UNet2DModel, UNet2DConditionModel) with torch-pruning's dependency
graph, with `ratio` meaning what it meant in Diff-Pruning (Fang et al., 2023): same widths, same counts.

How widths are chosen. torch-pruning groups every set of coupled channels (a conv's outputs, the
GroupNorm after it, the convs reading it, residual adds, ...). In each group of C channels we keep
C - n channels, where, as torch-pruning <= 1.4.0 did for the paper:

    n = C - int(C * (1 - ratio)),  rounded down to a multiple of L,  L = channel groups of the group

and L is the lcm of the GroupNorm groups, conv groups and attention heads in the group, so every
GroupNorm group and every head loses the same number of channels (the lowest-scored in each).
torch-pruning >= 1.4.1 instead keeps int(C/L * (1 - ratio)) per group, which prunes much more
(ddpm-cifar10 at 0.3: 128 -> 64 channels instead of 96); `rounding="per-group"` gives that rule.

Then, by default (round_to="2:4"), every kept width is rounded down to a multiple of TWO_FOUR_WIDTH_MULTIPLE,
so every layer that could be 2:4 before pruning still can after it (sparsify usually follows). The paper's
exact widths (its 19.85M-parameter row at 0.3) are round_to=None: its time embedding (358) and attention
(179) widths cannot be 2:4 along their input."""

from __future__ import annotations

import contextlib
import copy
import io
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from prunedm.architectures import example_inputs_for
from prunedm.nn._packing import GROUP as TWO_FOUR_GROUP
from prunedm.nn.modules import SparseConv2d, SparseLinear
from prunedm.nn.sparsify import WIDTH_ORIGIN_ATTR  # set on every layer whose width prune_channels changed
from prunedm.ops.sparse_mm import CONV_CHANNEL_ALIGNMENT
from prunedm.pruning.fixups import sync_diffusers_attributes
from prunedm.pruning.importance import (
    GRADIENT_IMPORTANCES,
    MAX_TIMESTEPS,
    GradientPass,
    accumulate_denoising_gradients,
    first_image_batch,
    make_importance,
    optional_import,
)

if TYPE_CHECKING:
    import torch_pruning as tp

ROUNDINGS = ("diff-pruning", "per-group")
# A width that keeps its readers 2:4-eligible: linears need in_features % 4 (2:4 groups run along the input)
# and the CUDA sparse conv needs Cin % CONV_CHANNEL_ALIGNMENT (16-byte channel gathers).
TWO_FOUR_WIDTH_MULTIPLE = math.lcm(TWO_FOUR_GROUP, CONV_CHANNEL_ALIGNMENT)


@dataclass
class ChannelPruningReport:
    """What prune_channels did. MACs and params are torch-pruning's count at `example_inputs`."""

    importance: str
    ratio: float
    rounding: str
    round_to: int | None
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    widths_before: dict[str, tuple[int, int]]
    widths_after: dict[str, tuple[int, int]]
    gradient_pass: GradientPass | None = None
    skipped_groups: list[str] = field(default_factory=list)
    config_updates: dict = field(default_factory=dict)

    @property
    def params_ratio(self) -> float:
        return self.params_after / self.params_before

    @property
    def macs_ratio(self) -> float:
        return self.macs_after / self.macs_before

    @property
    def changed_layers(self) -> dict[str, tuple[tuple[int, int], tuple[int, int]]]:
        """{layer: ((in, out) before, (in, out) after)} for layers whose width changed."""
        return {
            name: (before, self.widths_after[name])
            for name, before in self.widths_before.items()
            if name in self.widths_after and self.widths_after[name] != before
        }

    def summary(self) -> str:
        lines = [
            f"importance={self.importance} ratio={self.ratio} rounding={self.rounding} round_to={self.round_to}",
            f"params {self.params_before / 1e6:.3f}M -> {self.params_after / 1e6:.3f}M ({self.params_ratio:.3f}x)",
            f"MACs   {self.macs_before / 1e9:.3f}G -> {self.macs_after / 1e9:.3f}G ({self.macs_ratio:.3f}x)",
        ]
        if self.gradient_pass is not None:
            lines.append(self.gradient_pass.summary())
        lines += [f"  {name}: {b[0]}x{b[1]} -> {a[0]}x{a[1]}" for name, (b, a) in self.changed_layers.items()]
        return "\n".join(lines)


def layer_widths(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(in, out) channels of every conv, linear and norm layer, by qualified name."""
    widths = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            widths[name] = (module.in_channels, module.out_channels)
        elif isinstance(module, nn.Linear):
            widths[name] = (module.in_features, module.out_features)
        elif isinstance(module, nn.GroupNorm):
            widths[name] = (module.num_channels, module.num_channels)
        elif isinstance(module, nn.LayerNorm) and module.normalized_shape:
            widths[name] = (module.normalized_shape[-1], module.normalized_shape[-1])
    return widths


def count_macs_and_params(model: nn.Module, example_inputs: Mapping) -> tuple[int, int]:
    """torch-pruning's MAC and parameter count, run on a weightless (meta) copy: same numbers, no compute."""
    tp = optional_import("torch_pruning", "count_macs_and_params")
    memo = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        empty = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(empty, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else empty
    try:
        meta_model = copy.deepcopy(model, memo)
        meta_inputs = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in example_inputs.items()}
        with contextlib.redirect_stdout(io.StringIO()):  # its "no positional inputs" notice
            macs, params = tp.utils.count_ops_and_params(meta_model, meta_inputs)
    except (RuntimeError, NotImplementedError):  # an op without a meta kernel: count on the real model
        with contextlib.redirect_stdout(io.StringIO()):
            macs, params = tp.utils.count_ops_and_params(model, example_inputs)
    return int(macs), int(params)


def default_example_inputs(model: nn.Module, batch_size: int = 1) -> dict:
    """prunedm.architectures.example_inputs_for: forward kwargs sized from the config (ValueError "pass
    example_inputs: ..." when the config does not say)."""
    return example_inputs_for(model, batch_size)


def resolve_round_to(round_to: int | str | None) -> int | None:
    """round_to as a width multiple: "2:4" -> TWO_FOUR_WIDTH_MULTIPLE, a positive int -> itself, None -> None."""
    if round_to == "2:4":
        return TWO_FOUR_WIDTH_MULTIPLE
    if round_to is None or (isinstance(round_to, int) and not isinstance(round_to, bool) and round_to >= 1):
        return round_to
    raise ValueError(f'round_to must be "2:4", a positive integer or None, got {round_to!r}')


def first_sparse_layer(model: nn.Module) -> tuple[str, str] | None:
    """(name, class) of the first packed 2:4 layer (SparseLinear / SparseConv2d) in `model`, or None."""
    for name, module in model.named_modules():
        if isinstance(module, (SparseLinear, SparseConv2d)):
            return name or "(the model itself)", type(module).__name__
    return None


def kept_channels(
    channels: int, ratio: float, channel_groups: int = 1, rounding: str = "diff-pruning", round_to: int | None = None
) -> int:
    """How many of `channels` a group keeps at `ratio` (see the module docstring)."""
    if channels % channel_groups:
        raise ValueError(f"{channels} channels do not split into {channel_groups} equal groups")
    size = channels // channel_groups
    if rounding == "diff-pruning":
        removed_per_group = (channels - int(channels * (1 - ratio))) // channel_groups
    elif rounding == "per-group":
        removed_per_group = size - int(size * (1 - ratio))
    else:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    kept = channels - removed_per_group * channel_groups
    if round_to:
        step = math.lcm(round_to, channel_groups)
        kept = max(step, kept - kept % step) if channels >= step else channels
    return max(channel_groups, kept)


def prune_channels(
    model: nn.Module,
    importance: str | Callable = "diff-pruning",
    ratio: float = 0.3,
    example_inputs: Mapping | None = None,
    data: Iterable | torch.Tensor | None = None,
    ignored_layers: Sequence[nn.Module] | None = None,
    *,
    threshold: float = 0.05,
    scheduler=None,
    timesteps: Iterable[int] | None = None,
    max_timesteps: int | None = MAX_TIMESTEPS,
    rounding: str = "diff-pruning",
    round_to: int | str | None = "2:4",
    update_config: bool = True,
    seed: int = 0,
) -> ChannelPruningReport:
    """Prune channels of a diffusers UNet in place and return what changed.

    importance: "random", "magnitude"/"l2", "l1", "taylor", "diff-pruning", or a torch-pruning style
        callable `importance(group) -> per-channel scores`. The gradient-based ones need `data`.
    ratio: fraction of channels removed from every coupled group, before rounding (module docstring).
    example_inputs: forward kwargs used to trace the graph and count MACs (default: batch 1 sized from the
        config by prunedm.architectures.example_inputs_for; ValueError "pass example_inputs" when it cannot).
    data: image batches; the first batch feeds the gradient pass (noise-prediction loss under
        `scheduler`, DDPMScheduler(1000) by default, at `timesteps`, 0..T-1 by default). Diff-pruning
        stops at the first timestep whose loss is below `threshold` times the largest so far.
    max_timesteps: at most this many evenly spaced timesteps feed the gradients (every 10th of 1000 by
        default; accumulate_denoising_gradients says how that estimates the paper's sum); None visits
        every timestep, exactly as the paper's code. report.gradient_pass.summary() says what ran.
    ignored_layers: layers whose outputs are not pruned; conv_out always is (its outputs are the
        model's output channels).
    rounding: "diff-pruning" (default) or "per-group" width rule (module docstring).
    round_to: "2:4" (default) rounds every kept width down to a multiple of TWO_FOUR_WIDTH_MULTIPLE (8), so
        every layer that was 2:4-eligible stays so for sparsify; an int, a multiple of it; None, the rule's
        exact widths (Diff-Pruning's paper row: rounding="diff-pruning", round_to=None).
    update_config: rewrite block_out_channels/time_embedding_dim to the pruned widths when a model
        built from the new config has the same modules (save/load then needs only the exact shapes).
    The model must be dense (prune before sparsify); it runs under torch.no_grad() too (tracing needs autograd,
    which it turns on inside)."""
    sparse = first_sparse_layer(model)
    if sparse is not None:  # torch-pruning's grouping does not know packed layers: it ran 12+ minutes, then failed
        raise ValueError(
            f"prune_channels: prune before sparsify: {sparse[0]!r} is already a packed 2:4 {sparse[1]}; prune the "
            "dense (or masked dense) model, then call prunedm.sparsify"
        )
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    width_multiple = resolve_round_to(round_to)
    if isinstance(importance, str) and importance in GRADIENT_IMPORTANCES and data is None:
        raise ValueError(f"importance={importance!r} needs data: an iterable of image batches")
    tp = optional_import("torch_pruning", "prune_channels")
    name = importance if isinstance(importance, str) else type(importance).__name__
    scorer = make_importance(importance) if isinstance(importance, str) else importance
    example_inputs = dict(example_inputs) if example_inputs is not None else default_example_inputs(model)
    ignored = [model.conv_out] if hasattr(model, "conv_out") else []
    ignored += list(ignored_layers or [])

    was_training = model.training
    model.eval()
    macs_before, params_before = count_macs_and_params(model, example_inputs)
    widths_before = layer_widths(model)

    # torch-pruning traces the graph through autograd (grad_fn), and the gradient pass needs gradients: both
    # fail under a caller's torch.no_grad() (a typical inference script) unless grad is on here.
    with torch.enable_grad():
        gradient_pass = None
        if isinstance(importance, str) and importance in GRADIENT_IMPORTANCES:
            batch = data if isinstance(data, torch.Tensor) else next(iter(data), None)
            extra = {k: v for k, v in example_inputs.items() if k not in ("sample", "timestep")}
            if isinstance(batch, Mapping):  # the batch's own conditioning (captions' embeddings, class labels)
                extra.update({k: v for k, v in batch.items() if k not in ("images", "sample", "pixel_values")})
            gradient_pass = accumulate_denoising_gradients(
                model,
                first_image_batch([batch]),
                scheduler=scheduler,
                threshold=threshold if importance == "diff-pruning" else None,
                timesteps=timesteps,
                model_kwargs=extra,
                seed=seed,
                max_timesteps=max_timesteps,
            )
            for param in model.parameters():  # layers the loss never reached score zero rather than crash
                if param.grad is None:
                    param.grad = torch.zeros_like(param)

        skipped = []
        if ratio > 0:
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
            with torch.random.fork_rng(devices=[]):  # "random" draws from the global generator: seed it, then restore
                torch.manual_seed(seed)
                ignored_modules = [m for layer in ignored for m in layer.modules()]
                plans = _plan(graph, model, scorer, ratio, ignored_modules, rounding, width_multiple, skipped)
            for root, handler, idxs in plans:
                pruning_group = graph.get_pruning_group(root, handler, idxs)
                if graph.check_pruning_group(pruning_group):
                    pruning_group.prune()
                else:
                    skipped.append(f"{graph._module2name.get(root, root)}: torch-pruning refused the group")
            sync_diffusers_attributes(model)
    if gradient_pass is not None:
        model.zero_grad(set_to_none=True)

    widths_after = layer_widths(model)
    origin = f"prune_channels(ratio={ratio}, rounding={rounding!r}, round_to={round_to!r})"
    for layer_name, module in model.named_modules():
        if layer_name in widths_after and widths_before.get(layer_name) != widths_after[layer_name]:
            setattr(module, WIDTH_ORIGIN_ATTR, origin)
    config_updates = _update_config(model) if update_config and ratio > 0 else {}
    macs_after, params_after = count_macs_and_params(model, example_inputs)
    model.train(was_training)
    return ChannelPruningReport(
        importance=name,
        ratio=ratio,
        rounding=rounding,
        round_to=width_multiple,
        params_before=int(params_before),
        params_after=int(params_after),
        macs_before=int(macs_before),
        macs_after=int(macs_after),
        widths_before=widths_before,
        widths_after=widths_after,
        gradient_pass=gradient_pass,
        skipped_groups=skipped,
        config_updates=config_updates,
    )


def _plan(graph, model, scorer, ratio, ignored_modules, rounding, width_multiple, skipped) -> list[tuple]:
    """(root layer, pruning fn, channel indices to remove) for every prunable group, scored before any is pruned."""
    heads, gated = _attention_heads(model), _gated_projections(model)
    plans = []
    for group in graph.get_all_groups(ignored_layers=ignored_modules, root_module_types=[nn.Conv2d, nn.Linear]):
        root, handler = group[0].dep.target.module, group[0].dep.handler
        root_name = graph._module2name.get(root, type(root).__name__)
        # A gated projection (GEGLU) makes 2 outputs per unit: both halves lose the same units.
        chunks = gated.get(root, 1) if graph.is_out_channel_pruning_fn(handler) else 1
        channels = graph.get_out_channels(root) // chunks
        groups = _channel_groups(group, heads, graph)
        if channels % groups:
            skipped.append(f"{root_name}: {channels} channels do not split into {groups} groups")
            continue
        keep = kept_channels(channels, ratio, groups, rounding, width_multiple)
        if keep >= channels:
            continue
        with torch.no_grad():
            scores = scorer(group)
        if scores is None:
            skipped.append(f"{root_name}: no parameters to score")
            continue
        scores = scores.float().cpu().view(chunks, channels).sum(0)
        units = _lowest_per_group(scores, groups, channels - keep)
        plans.append((root, handler, [u + c * channels for c in range(chunks) for u in units]))
    return plans


def _attention_heads(model: nn.Module) -> dict[nn.Module, int]:
    """{q/k/v projection: heads} for diffusers Attention modules, so heads lose equal dims."""
    heads = {}
    for module in model.modules():
        if hasattr(module, "to_q") and hasattr(module, "heads"):
            head_dim = module.to_q.out_features // module.heads
            for proj in ("to_q", "add_q_proj"):
                if isinstance(getattr(module, proj, None), nn.Linear):
                    heads[getattr(module, proj)] = module.heads
            for proj in ("to_k", "to_v", "add_k_proj", "add_v_proj"):
                layer = getattr(module, proj, None)
                if isinstance(layer, nn.Linear):
                    heads[layer] = max(1, layer.out_features // head_dim)
    return heads


def _gated_projections(model: nn.Module) -> dict[nn.Module, int]:
    """{projection: 2} for GEGLU/SwiGLU-style layers whose output is split in two and multiplied."""
    return {m.proj: 2 for m in model.modules() if type(m).__name__ in ("GEGLU", "SwiGLU") and hasattr(m, "proj")}


def _channel_groups(group, heads: dict[nn.Module, int], graph: tp.DependencyGraph) -> int:
    """lcm of the GroupNorm groups, conv groups and attention heads that share this group's channels."""
    count = 1
    for dep, _ in group:
        module, handler = dep.target.module, dep.handler
        if isinstance(module, nn.GroupNorm):
            count = math.lcm(count, module.num_groups)
        elif isinstance(module, nn.modules.conv._ConvNd) and 1 < module.groups != module.out_channels:
            count = math.lcm(count, module.groups)
        elif module in heads and graph.is_out_channel_pruning_fn(handler):
            count = math.lcm(count, heads[module])
    return count


def _lowest_per_group(scores: torch.Tensor, groups: int, n_removed: int) -> list[int]:
    """Indices of the n_removed / groups lowest scores inside each of `groups` contiguous blocks."""
    size = scores.numel() // groups
    per_group = n_removed // groups
    blocks = scores[: size * groups].view(groups, size)
    lowest = blocks.argsort(dim=1, stable=True)[:, :per_group]
    offsets = torch.arange(groups).unsqueeze(1) * size
    return sorted((lowest + offsets).flatten().tolist())


def _update_config(model: nn.Module) -> dict:
    """Write the pruned block widths into the config, if a model built from it has the same modules."""
    config = getattr(model, "config", None)
    down_blocks = getattr(model, "down_blocks", None)
    if config is None or down_blocks is None or "block_out_channels" not in config:
        return {}
    updates = {}
    widths = [block.resnets[-1].conv2.out_channels for block in down_blocks if getattr(block, "resnets", None)]
    if len(widths) == len(config.block_out_channels) and tuple(widths) != tuple(config.block_out_channels):
        updates["block_out_channels"] = tuple(widths)
    time_embedding = getattr(model, "time_embedding", None)
    if "time_embedding_dim" in config and isinstance(getattr(time_embedding, "linear_1", None), nn.Linear):
        dim = time_embedding.linear_1.out_features
        first_width = updates.get("block_out_channels", config.block_out_channels)[0]
        if dim != (config.time_embedding_dim or first_width * 4):
            updates["time_embedding_dim"] = dim
    if not updates or not _same_modules(model, {**config, **updates}):
        return {}
    model.register_to_config(**updates)
    return updates


def _same_modules(model: nn.Module, config: dict) -> bool:
    """Whether type(model).from_config(config) has the same module names and types as model."""
    try:
        with torch.device("meta"):
            rebuilt = type(model).from_config(config)
    except Exception:  # a config diffusers refuses is simply not written
        return False
    shape = lambda m: [(n, type(x).__name__) for n, x in m.named_modules()]  # noqa: E731
    return shape(rebuilt) == shape(model)
