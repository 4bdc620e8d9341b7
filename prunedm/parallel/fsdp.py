"""FSDP2 for the mask learners (parallel: fsdp): the frozen model sharded per block with
torch.distributed.fsdp.fully_shard, the learnable logits and their optimizer state sharded by rows as
DTensors (Shard(0)), and each rank sampling its rows with the Philox stream at their global offset, so a
sharded run draws exactly the masks one process would."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

# Where diffusers models keep their repeated blocks (UNet2DModel / UNet2DConditionModel, DiT / SD3 / Flux
# transformers); fully_shard wraps each, then the root. A model without them is sharded as one unit.
BLOCK_LISTS = ("down_blocks", "up_blocks", "transformer_blocks", "single_transformer_blocks", "blocks", "layers")
BLOCK_MODULES = ("mid_block",)
# Blocks a model's own forward reads outside the block's forward (DiTTransformer2DModel's output layer calls
# transformer_blocks[0].norm1.emb): left to the root's unit, which is gathered for the whole forward.
READ_OUTSIDE = {"DiTTransformer2DModel": ("transformer_blocks", 0)}


def world_size() -> int:
    """Ranks in the default process group (1 without torch.distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def row_range(rows: int, rank: int, world: int) -> tuple[int, int]:
    """[first, end) rows of `rank` when `rows` are split as DTensor's Shard(0) does (torch.chunk: ceil(rows /
    world) per rank, the last ranks short or empty)."""
    per_rank = -(-rows // world)
    first = min(rows, rank * per_rank)
    return first, min(rows, first + per_rank)


def _is_dtensor(tensor) -> bool:
    """isinstance(tensor, DTensor), without importing torch.distributed.tensor (~1.4 s) for plain runs: no
    DTensor can exist before that module is imported."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def device_mesh(device: torch.device) -> DeviceMesh:
    """A 1-D mesh over every rank of the default process group, on `device`'s type."""
    if world_size() == 1 and not dist.is_initialized():
        raise ValueError("parallel 'fsdp' needs torch.distributed initialised (launch with torchrun)")
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(torch.device(device).type, (world_size(),))


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks (BLOCK_LISTS entries' children, BLOCK_MODULES), in registration order, less
    READ_OUTSIDE's."""
    outside = READ_OUTSIDE.get(type(model).__name__)
    skip = getattr(model, outside[0])[outside[1]] if outside is not None else None
    blocks: list[nn.Module] = []
    for name, child in model.named_children():
        if name in BLOCK_LISTS and isinstance(child, nn.ModuleList):
            for block in child:
                blocks.extend(find_blocks(block) if isinstance(block, nn.ModuleList) else [block])
        elif name in BLOCK_MODULES and child is not None:
            blocks.append(child)
    return [block for block in blocks if block is not skip]


def _policy(compute_dtype, output_dtype=None) -> dict:
    """fully_shard's mp_policy keyword for a compute dtype (none for None): parameters gathered and the forward's
    floating inputs cast to it, gradients reduced in fp32, the floating outputs cast to output_dtype (None: kept)."""
    if compute_dtype is None:
        return {}
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return {"mp_policy": MixedPrecisionPolicy(compute_dtype, torch.float32, output_dtype)}


def shard_model(
    model: nn.Module, mesh: DeviceMesh, blocks: Iterable[nn.Module] | None = None, compute_dtype=None,
    output_dtype=None,
) -> list[nn.Module]:  # fmt: skip
    """fully_shard each block (default: find_blocks(model)), then the root; returns the blocks. compute_dtype
    (e.g. torch.bfloat16): FSDP2's MixedPrecisionPolicy, the gathered parameters and the forward in that dtype,
    the sharded (master) parameters and the gradient reduction in fp32 (parameters already stored in that dtype
    stay so); output_dtype: the root's floating outputs cast to it (the blocks' are left as they come)."""
    from torch.distributed.fsdp import fully_shard

    blocks = find_blocks(model) if blocks is None else list(blocks)
    for block in blocks:
        fully_shard(block, mesh=mesh, **_policy(compute_dtype))
    fully_shard(model, mesh=mesh, **_policy(compute_dtype, output_dtype))
    return blocks


def cast_as_policy(model: nn.Module, compute_dtype: torch.dtype, output_dtype: torch.dtype | None = None) -> list:
    """In one process, what shard_model(model, compute_dtype=, output_dtype=) makes FSDP2 do to a forward whose
    parameters are stored in compute_dtype: the floating inputs of each of find_blocks(model) and of the root cast to
    compute_dtype, the root's floating outputs to output_dtype. Returns the hooks' handles (.remove() undoes it)."""
    from torch.distributed.utils import _apply_to_tensors  # the container walk FSDP2 casts with

    def cast(dtype, tree):
        return _apply_to_tensors(lambda t: t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t, tree)

    def cast_inputs(_, args, kwargs):
        return cast(compute_dtype, args), cast(compute_dtype, kwargs)

    handles = [
        module.register_forward_pre_hook(cast_inputs, with_kwargs=True) for module in [*find_blocks(model), model]
    ]
    if output_dtype is not None:
        handles.append(model.register_forward_hook(lambda _, __, output: cast(output_dtype, output)))
    return handles


def distribute_rows(tensor: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """This rank's rows of `tensor` (the same full tensor on every rank) as a row-sharded DTensor (Shard(0))."""
    from torch.distributed.tensor import Shard, distribute_tensor

    return distribute_tensor(tensor.detach(), mesh, [Shard(0)], src_data_rank=None)


def shard_rows(tensor: torch.Tensor, mesh: DeviceMesh) -> nn.Parameter:
    """A parameter holding this rank's rows of `tensor` (the same full tensor on every rank) as a DTensor."""
    return nn.Parameter(distribute_rows(tensor, mesh), requires_grad=tensor.requires_grad)


def rows_like(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`local` (this rank's rows, as local_rows(like) gives them) as a DTensor sharded as `like`; `local` itself
    when `like` is a plain tensor (e.g. a gradient computed on a shard, for the optimizer)."""
    if not _is_dtensor(like):
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, like.device_mesh, like.placements, run_check=False, shape=like.shape,
                              stride=like.stride())  # fmt: skip


def local_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(this rank's rows, index of its first row) of a row-sharded DTensor; (tensor, 0) for a plain tensor."""
    if not _is_dtensor(tensor):
        return tensor, 0
    from torch.distributed.tensor import Shard

    if tuple(tensor.placements) != (Shard(0),):
        raise ValueError(f"local_rows: expected a DTensor sharded by rows (Shard(0)), got {tensor.placements}")
    mesh = tensor.device_mesh
    first, end = row_range(tensor.shape[0], mesh.get_local_rank(), mesh.size())
    local = tensor.to_local()
    if local.shape[0] != end - first:
        raise ValueError(f"local_rows: this rank holds {local.shape[0]} rows, Shard(0) gives it {end - first}")
    return local, first


class _GatherRows(torch.autograd.Function):
    """Every rank's rows, concatenated (all-gather); backward: the gradient averaged over ranks (each rank's
    loss is its own batch's mean, so the mean is the joined batch's gradient), this rank's rows of it."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, rows: int, group) -> torch.Tensor:
        world = dist.get_world_size(group)
        rank = dist.get_rank(group)
        ctx.rows_range, ctx.group, ctx.world = row_range(rows, rank, world), group, world
        per_rank = -(-rows // world)
        send = local.to(torch.uint8) if local.dtype == torch.bool else local
        padded = send.new_zeros((per_rank, *local.shape[1:]))
        padded[: local.shape[0]] = send
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous(), group=group)
        full = torch.cat(parts)[:rows]
        return full.to(torch.bool) if local.dtype == torch.bool else full

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        first, end = ctx.rows_range
        return grad[first:end].div_(ctx.world), None, None


def gather_rows(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The full tensor of every rank's rows of `local` (sharded as the row-sharded DTensor `like`), differentiable;
    `local` itself when `like` is a plain tensor."""
    if not _is_dtensor(like):
        return local
    return _GatherRows.apply(local, like.shape[0], like.device_mesh.get_group())


def sample_rows(op: Callable[..., torch.Tensor], logits: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """op(logits, *args, **kwargs) (a Gumbel sampling op of prunedm.ops) for plain or row-sharded logits:
    each rank samples its rows at their global offset and the rows are gathered, so the result is exactly
    what one process sampling the full logits gets (its gradient reaching each rank's rows)."""
    local, first = local_rows(logits)
    if local is logits:
        return op(logits, *args, **kwargs)
    offset = first * math.prod(logits.shape[1:])
    return gather_rows(op(local, *args, offset=offset, **kwargs), logits)


@torch.no_grad()
def full_rows(tensor: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """reduce(rows) of every rank, gathered (on every rank): e.g. each row's argmax without gathering the logits."""
    local, _ = local_rows(tensor)
    out = local if reduce is None else reduce(local)
    return gather_rows(out, tensor)


def sum_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """value summed over the ranks of the default process group (a new tensor; no gradient)."""
    total = value.detach().clone()
    if world_size() > 1:
        dist.all_reduce(total)
    return total


def replace_params(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
    """Make an optimizer with one parameter group and no state yet optimise `params` instead (its settings kept)."""
    if len(optimizer.param_groups) != 1 or optimizer.state:
        raise ValueError("replace_params: shard before the first step (one parameter group, no state)")
    optimizer.param_groups[0]["params"] = list(params)
