"""What every N:M mask learner shares: the layers it targets, the masked-weight hook on them, its
optimizers, hard masks out, and its state through prunedm.masks.state (and FSDP-sharded checkpoints)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize

from prunedm.masks import state as _state
from prunedm.masks import targets as _targets
from prunedm.masks.recompute import MaskedWeightRecompute
from prunedm.ops import _checks
from prunedm.parallel import fsdp

LossFn = Callable[[nn.Module, object], torch.Tensor]

_SEED_MODULUS = 2**63
# compute_dtype: the frozen model stored and run in it (mixed precision); logits, optimizer state, reductions fp32.
COMPUTE_DTYPES = (None, torch.bfloat16)


class MaskedWeight(nn.Module):
    """Parametrization of a target's weight: weight * mask, with `mask` (weight-shaped; a callable giving one
    when the layer runs, so that no layer's mask outlives its use; or None for the dense weight) set by the
    learner before each forward. recompute: where the product is recorded to be remade in the backward."""

    def __init__(self, recompute: MaskedWeightRecompute | None = None) -> None:
        super().__init__()
        self.mask: torch.Tensor | Callable[[], torch.Tensor] | None = None
        self.recompute = recompute

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            return weight
        source = self.mask
        product = weight * (source() if callable(source) else source).to(weight.dtype)
        if self.recompute is not None:
            self.recompute.record(product, weight, source)
        return product


class MaskLearner(_state.StateFile):
    """Base of the N:M mask learners. Subclasses hold per-target learnable state, sample masks in
    `sample()`, take a training step in `step(batch)`, and give the final hard masks in `masks()`.

    On construction the learner finds its targets (Linear and Conv2d layers by default, filtered by
    `include`/`exclude` regexes or predicates on module names), and parametrizes each target's
    weight as weight * mask so that the model's own forward sees the current mask. With model_lr 0
    the model's parameters are frozen (restored by finalize); otherwise an AdamW with model_lr
    trains them through the masked weights.

    Under torch.distributed (any backend; one learner per rank, each with its own batches) the
    learners keep identical masks on every rank: sampling seeds depend only on (seed, step, target),
    and what the ranks' batches make differ (logit gradients, losses, and the trained weights'
    gradients unless the model is wrapped in DistributedDataParallel) is averaged across ranks.
    shard() (parallel: fsdp) shards the frozen model, the logits and their optimizer state across the
    ranks instead; save_sharded()/load_sharded() checkpoint that state with torch.distributed.checkpoint.

    compute_dtype torch.bfloat16 (mixed precision; needs model_lr 0): once the subclass has set up its logits from
    the fp32 weights, the frozen model is cast to bf16 in place (stored, gathered and run in bf16; so is the
    masked weight W * M) and its forward casts as FSDP2's MixedPrecisionPolicy does (fsdp.cast_as_policy: inputs
    of each block to bf16, the root's outputs to fp32), sharded or not; the logits, their gradients, the optimizer
    state and every reduction across ranks stay fp32, and masks are sampled from them as in fp32."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        n: int = 2,
        m: int = 4,
        *,
        model_lr: float = 0.0,
        types: Iterable[type] = _targets.DEFAULT_TYPES,
        include: _targets.ModuleFilter = None,
        exclude: _targets.ModuleFilter = None,
        seed: int = 0,
        backend: str = "auto",
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        _checks.check_nm(type(self).__name__, n, m)
        if compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(
                f"{type(self).__name__}: compute_dtype must be None or torch.bfloat16, got {compute_dtype}"
            )
        if compute_dtype is not None and model_lr:
            raise ValueError(f"{type(self).__name__}: compute_dtype {compute_dtype} learns masks of a frozen model: "
                             f"model_lr must be 0, got {model_lr}")  # fmt: skip
        if not 0 < n < m:
            raise ValueError(f"{type(self).__name__}: a mask learner needs 0 < n < m, got n = {n}, m = {m}")
        self.model, self.loss_fn, self.n, self.m = model, loss_fn, n, m
        self.seed, self.backend = int(seed), backend
        self.step_count = 0
        self.sharded = False
        self.compute_dtype, self._cast_hooks = compute_dtype, []
        self.targets, self.skipped = _targets.find_targets(model, m, types=types, include=include, exclude=exclude)
        if not self.targets:
            raise ValueError(
                f"{type(self).__name__}: no target layers found (skipped: {self.skipped or 'none matched'})"
            )
        self._hooks: dict[str, MaskedWeight] = {}
        self._recompute = MaskedWeightRecompute()  # subclasses run a forward under its active() to use it
        for name, module in self.targets.items():
            hook = MaskedWeight(self._recompute)
            parametrize.register_parametrization(module, "weight", hook, unsafe=True)
            self._hooks[name] = hook
        self.model_lr = float(model_lr)
        self._frozen: list[nn.Parameter] = []
        self.model_optimizer: torch.optim.Optimizer | None = None
        trainable = [p for p in model.parameters() if p.requires_grad]
        if self.model_lr > 0:
            self.model_optimizer = torch.optim.AdamW(trainable, lr=self.model_lr, weight_decay=0.0)
        else:
            self._frozen = trainable
            for p in trainable:
                p.requires_grad_(False)

    # Subclass interface ---------------------------------------------------------------------------

    def masks(self) -> dict[str, torch.Tensor]:
        """The final hard masks: bool, weight-shaped, exactly n of every m kept, keyed by module name."""
        raise NotImplementedError

    def step(self, batch) -> dict:
        raise NotImplementedError

    def _optimizers(self) -> dict[str, torch.optim.Optimizer]:
        optimizers = {"mask_optimizer": self.mask_optimizer}
        if self.model_optimizer is not None:
            optimizers["model_optimizer"] = self.model_optimizer
        return optimizers

    # Shared machinery ----------------------------------------------------------------------------

    def _use_compute_dtype(self) -> None:
        """Cast the frozen model to compute_dtype and its forward as FSDP2's policy would (subclasses call it last
        in __init__, once their state is set up from the fp32 weights); nothing without a compute_dtype."""
        if self.compute_dtype is None:
            return
        self.model.to(self.compute_dtype)
        self._cast_hooks = fsdp.cast_as_policy(self.model, self.compute_dtype, torch.float32)

    def _remove_cast_hooks(self) -> None:
        for handle in self._cast_hooks:
            handle.remove()
        self._cast_hooks = []

    # Multi-process learning: every rank samples the same masks (same seed and step), and the
    # learner averages what differs between ranks' batches, so masks stay identical on all ranks.

    @property
    def _device(self) -> torch.device:
        return _targets.raw_weight(next(iter(self.targets.values()))).device

    def _average_across_ranks(self, tensors: list[torch.Tensor]) -> None:
        """All-reduce (mean) in place across the default process group; nothing in one process."""
        world = fsdp.world_size()
        if world == 1:
            return
        for tensor in tensors:
            torch.distributed.all_reduce(tensor)
            tensor.div_(world)

    def _average_model_grads(self) -> None:
        """Average the trained weights' gradients across ranks, unless DistributedDataParallel already does."""
        if self.model_optimizer is None or isinstance(self.model, nn.parallel.DistributedDataParallel):
            return
        grads = [p.grad for group in self.model_optimizer.param_groups for p in group["params"] if p.grad is not None]
        self._average_across_ranks(grads)

    def _sample_seed(self, target_index: int) -> int:
        """The Philox seed of a target's sample at the current step: fixed by (seed, step, target)."""
        return ((self.seed * 1_000_003 + self.step_count) * 65_537 + target_index) % _SEED_MODULUS

    def _set_matrix_masks(self, matrices: dict[str, torch.Tensor] | None) -> None:
        """Make the model's forward use these masks ([R, K] GEMM layout, by name); None: dense weights."""
        for name, module in self.targets.items():
            mask = None if matrices is None else _targets.matrix_to_weight(module, matrices[name])
            self._hooks[name].mask = mask

    def _set_masks(self, masks: dict[str, torch.Tensor] | None) -> None:
        for name in self.targets:
            self._hooks[name].mask = None if masks is None else masks[name]

    @torch.no_grad()
    def loss_with_masks(self, batch, masks: dict[str, torch.Tensor] | None = None) -> float:
        """loss_fn(model, batch) under the given weight-shaped masks (default: the learner's final masks)."""
        previous = {name: hook.mask for name, hook in self._hooks.items()}
        self._set_masks(self.masks() if masks is None else masks)
        try:
            return float(self.loss_fn(self.model, batch))
        finally:
            for name, hook in self._hooks.items():
                hook.mask = previous[name]

    def finalize(self) -> dict[str, torch.Tensor]:
        """Remove the masked-weight hooks, zero the pruned weights in place, unfreeze; returns the masks. With a
        compute_dtype the model stays in it (its fp32 weights are gone): mask a fresh fp32 copy to keep them."""
        masks = self.masks()
        self._remove_cast_hooks()
        for module in self.targets.values():
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        _targets.apply_masks(self.model, masks)
        for p in self._frozen:
            p.requires_grad_(True)
        self._frozen = []
        return masks

    def _trained_params(self) -> list[nn.Parameter]:
        if self.model_optimizer is None:
            return []
        return [p for group in self.model_optimizer.param_groups for p in group["params"]]

    def _identity(self) -> dict:
        identity = {"class": type(self).__name__, "n": self.n, "m": self.m, "targets": list(self.targets)}
        if self.compute_dtype is not None:  # absent in fp32 (and older) states
            identity["compute_dtype"] = str(self.compute_dtype).removeprefix("torch.")
        return identity

    def _check_meta(self, meta: dict) -> None:
        what = type(self).__name__
        if meta["class"] != what or (meta["n"], meta["m"]) != (self.n, self.m):
            raise ValueError(
                f"{what}: state is from a {meta['class']} with n:m = {meta['n']}:{meta['m']}, "
                f"this learner is {self.n}:{self.m}"
            )
        if meta["targets"] != list(self.targets):
            missing = sorted(set(meta["targets"]) ^ set(self.targets))
            raise ValueError(f"{what}: state targets differ from this model's: {missing[:5]}")
        mine = self._identity().get("compute_dtype", "float32")
        if meta.get("compute_dtype", "float32") != mine:
            raise ValueError(f"{what}: state was learned with compute_dtype {meta.get('compute_dtype', 'float32')}, "
                             f"this learner computes in {mine}")  # fmt: skip
        _state.check_step_meta(what, meta)

    # FSDP (parallel: fsdp) -------------------------------------------------------------------------

    def shard(self, blocks: Iterable[nn.Module] | None = None) -> None:
        """Shard across the default process group (every rank calls it, before the first step): the frozen model
        with FSDP2 per block (default: prunedm.parallel.fsdp.find_blocks) and the root, the logits and their
        optimizer state by rows. Each rank then samples its rows at their global Philox offset and the masks
        are gathered, so every step equals one process's on the joined batch."""
        if self.model_optimizer is not None:
            raise ValueError(
                f"{type(self).__name__}: parallel 'fsdp' learns masks of a frozen model: model_lr must be 0"
            )
        if self.sharded or self.step_count:
            raise ValueError(f"{type(self).__name__}: shard() once, before the first step")
        mesh = fsdp.device_mesh(self._device)
        self._remove_cast_hooks()  # FSDP2's MixedPrecisionPolicy casts instead
        output_dtype = None if self.compute_dtype is None else torch.float32
        fsdp.shard_model(self.model, mesh, blocks, compute_dtype=self.compute_dtype, output_dtype=output_dtype)
        self.logits = {name: fsdp.shard_rows(logits, mesh) for name, logits in self.logits.items()}
        fsdp.replace_params(self.mask_optimizer, list(self.logits.values()))
        self.sharded = True

    def _sharded_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"learner.{key}": value.detach() for key, value in self._state_tensors().items()}
        for prefix, optimizer in self._optimizers().items():
            params = [p for group in optimizer.param_groups for p in group["params"]]
            for index, param in enumerate(params):
                for key, value in optimizer.state.get(param, {}).items():
                    tensors[f"{prefix}.{index}.{key}"] = value
        return tensors

    def save_sharded(self, path: str | os.PathLike) -> None:
        """Write the learner's state as a torch.distributed.checkpoint directory (every rank calls it; a plain
        learner in one process may too), complete or absent; load_sharded() reads it on any number of ranks."""
        from prunedm.parallel import checkpoint as sharded_checkpoint  # torch.distributed.checkpoint: ~3 s to import

        if self.model_optimizer is not None:
            raise ValueError(f"{type(self).__name__}: sharded checkpoints hold frozen-model learners (model_lr 0)")
        meta = self._meta()
        for prefix, optimizer in self._optimizers().items():
            meta["optimizers"][prefix] = optimizer.state_dict()["param_groups"]
        meta = json.loads(json.dumps(meta, default=_state.json_default))
        rng = _state.rng_state_tensors()
        sharded_checkpoint.save(path, self._sharded_tensors(), meta, lambda file: _state.save_state_file(file, rng, {}))

    def load_sharded(self, path: str | os.PathLike, restore_rng_state: bool = True) -> None:
        """Resume from save_sharded()'s directory, on this learner's ranks (any number; sharded or not). The
        global RNG streams continue where they stopped when the rank count is the one that saved. ValueError
        naming the directory if it cannot be used; then the learner is unchanged."""
        from prunedm.parallel import checkpoint as sharded_checkpoint

        meta = sharded_checkpoint.read_meta(path)
        try:
            self._check_meta(meta)
            self._check_extra_state(meta["extra"])
            if sorted(meta["optimizers"]) != sorted(self._optimizers()):
                raise ValueError(
                    f"optimizers {sorted(meta['optimizers'])}, this learner has {sorted(self._optimizers())}"
                )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: {type(exc).__name__}: {exc}"[:300]) from exc
        for optimizer in self._optimizers().values():
            sharded_checkpoint.init_optimizer_state(optimizer)
        live = self._sharded_tensors()
        fresh = {key: torch.empty_like(value) for key, value in live.items()}
        sharded_checkpoint.load(path, fresh)
        rng = sharded_checkpoint.rank_file(path) if meta["world_size"] == fsdp.world_size() else None
        rng_tensors = _state.load_state_file(rng)[0] if rng is not None and restore_rng_state else None
        with torch.no_grad():
            for key, value in live.items():
                value.copy_(fresh[key])
        self.seed, self.step_count = meta["seed"], meta["step"]
        self._load_extra_state(meta["extra"])
        for prefix, optimizer in self._optimizers().items():
            for group, saved in zip(optimizer.param_groups, meta["optimizers"][prefix]):
                group.update({key: value for key, value in saved.items() if key != "params"})
        if rng_tensors is not None:
            _state.restore_rng(rng_tensors)


def is_finite_number(value) -> bool:
    """A real int or float (not a bool, not a string) that is finite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
