"""MaskPro-style N:M mask learning (linear-space probabilistic masks): one logit per weight, masks drawn
n of m without replacement, logits trained by forward-only REINFORCE against the initial mask's loss.

Official code (woodenchild95/Maskpro, train.py): logits = 10 x initial mask, plain SGD at lr 50 on
(L(sampled) - L(initial) - b) * grad log P, b an EMA (0.99, from 0, no bias correction) of the loss
change, one sample per step, about 10,000 steps. That is the "official" preset and the default.
Deviations, with reasons:
- grad log P is the exact Plackett-Luce set probability (set_log_prob) where the official code uses a
  closed-form approximation; the initial mask's loss is computed on the same batch and the same noise
  instead of precomputed per minibatch (a diffusion loss draws noise and timesteps every call).
- Options the official code lacks, for short budgets (prunedm issue 15): K samples per step sharing
  noise and timesteps with a leave-one-out baseline, a bias-corrected EMA baseline, advantages divided
  by their running RMS (lr in logit units, not loss units), and logit_init chosen from the step budget.
  With logits 10 x mask a group leaves its set with probability ~3e-4.5 ... 3e-10 per draw: in 50-300
  steps nothing flips and the result is the magnitude mask. The "short" preset combines them."""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterable

import torch
from torch import nn

from prunedm import ops
from prunedm.masks import targets as _targets
from prunedm.masks.learner import LossFn, MaskLearner, is_finite_number
from prunedm.parallel import fsdp

BASELINES = ("ema", "ema-corrected", "loo")

# Named presets. "official": the constants of woodenchild95/Maskpro's train.py (--lr 50 --logits 10, EMA
# 0.99). "short": prunedm's preset for 25-400 steps (issue 15: K = 4 with leave-one-out learns where
# the official constants never flip a group); logit_init "budget" needs total_steps.
PRESETS: dict[str, dict] = {
    "official": {"samples": 1, "baseline": "ema", "baseline_decay": 0.99, "normalize_advantage": False,
                 "logit_init": 10.0, "mask_lr": 50.0},
    "short": {"samples": 4, "baseline": "loo", "baseline_decay": 0.9, "normalize_advantage": True,
              "logit_init": "budget", "mask_lr": 1.0},
}  # fmt: skip


def top_n_mask(logits: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Bool mask keeping the n largest logits of every m along the last dim (ties to the lower index)."""
    groups = logits.reshape(*logits.shape[:-1], logits.shape[-1] // m, m)
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order[..., :n], True)
    return keep.reshape(logits.shape)


def set_log_prob(logits: torch.Tensor, mask: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """[..., K/m]: log-probability that n draws without replacement from softmax(group logits) keep exactly
    the set `mask` marks, summed over the set's n! draw orders (exact; differentiable in logits)."""
    groups = logits.reshape(*logits.shape[:-1], logits.shape[-1] // m, m)
    kept = mask.reshape(groups.shape)
    # The kept indices of each group, in increasing order.
    index = torch.sort(kept.to(torch.int8), dim=-1, descending=True, stable=True).indices[..., :n]
    log_p = torch.log_softmax(groups.float(), -1).gather(-1, index)  # [..., G, n]
    p = log_p.exp()
    orders = []
    for order in itertools.permutations(range(n)):
        used = torch.zeros_like(p[..., 0])
        log_prob = torch.zeros_like(used)
        for i in order:
            log_prob = log_prob + log_p[..., i] - torch.log1p(-used.clamp(max=1 - 1e-7))
            used = used + p[..., i]
        orders.append(log_prob)
    return torch.logsumexp(torch.stack(orders, -1), -1)


def leave_probability(logit: float, n: int = 2, m: int = 4) -> float:
    """Probability that one draw leaves a group's initial set when its kept weights have logit `logit`
    and the others 0."""
    logits = torch.tensor([[logit] * n + [0.0] * (m - n)], dtype=torch.float64)
    return float(-torch.expm1(set_log_prob(logits, logits != 0, n, m)).squeeze())


def logit_init_for_budget(total_steps: int, samples: int = 1, n: int = 2, m: int = 4, explorations: float = 16.0,
                          bounds: tuple[float, float] = (3.0, 10.0)) -> float:  # fmt: skip
    """The logit (kept weights, others 0) at which a group leaves its initial set in about `explorations`
    of its total_steps * samples draws, within `bounds`: enough draws off the initial mask for every
    group to be tried, few enough that the sampled masks stay near it (lower logits drift to random)."""
    if not isinstance(total_steps, int) or total_steps < 1 or samples < 1:
        raise ValueError(f"logit_init_for_budget: total_steps and samples must be >= 1, got {total_steps}, {samples}")
    target = min(explorations / (total_steps * samples), 0.5)
    low, high = bounds
    if leave_probability(high, n, m) >= target:
        return high
    if leave_probability(low, n, m) <= target:
        return low
    for _ in range(60):  # leave_probability falls as the logit rises: bisection
        mid = (low + high) / 2
        low, high = (mid, high) if leave_probability(mid, n, m) > target else (low, mid)
    return (low + high) / 2


class MaskProLearner(MaskLearner):
    """Learns N:M masks as one logit per weight, initialised to initial_mask * logit_init (initial_masks:
    "magnitude" or a dict of weight-shaped masks by module name; logit_init "budget": from total_steps
    and samples by logit_init_for_budget).

    Each step(batch) draws `samples` (K) masks, every group's kept set n samples without replacement
    from softmax of its m logits (ops.gumbel_nm_sample, hard), and evaluates the loss forward only on
    the same batch and the same random stream (noise, timesteps) for every mask. Baselines:
    "ema" (official): delta_k = L(sample k) - L(initial mask), b <- decay * b + (1 - decay) * mean delta,
    advantage_k = delta_k - b; "ema-corrected": the same with b / (1 - decay^t) (Adam's bias correction;
    a 0-start EMA otherwise lags and every early advantage has the sign of the first deltas);
    "loo" (K >= 2): advantage_k = L_k - mean of the other K - 1 losses (no initial-mask forward).
    normalize_advantage divides advantages by their running RMS (EMA with baseline_decay, corrected).
    The logits take an SGD step: logits -= mask_lr * mean_k advantage_k * grad log P(sample k)
    (exact set probabilities). No gradient flows through the network for the masks; with model_lr > 0
    the weights are also trained (AdamW) on the mean sampled loss, which needs backward passes. The
    final mask keeps the n largest logits of each group.

    preset ("official" or "short", see PRESETS) fills every option left at None."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        n: int = 2,
        m: int = 4,
        *,
        preset: str = "official",
        initial_masks: str | dict[str, torch.Tensor] = "magnitude",
        logit_init: float | str | None = None,
        mask_lr: float | None = None,
        samples: int | None = None,
        baseline: str | None = None,
        baseline_decay: float | None = None,
        normalize_advantage: bool | None = None,
        total_steps: int | None = None,
        model_lr: float = 0.0,
        types: Iterable[type] = _targets.DEFAULT_TYPES,
        include: _targets.ModuleFilter = None,
        exclude: _targets.ModuleFilter = None,
        seed: int = 0,
        backend: str = "auto",
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        if preset not in PRESETS:
            raise ValueError(f"MaskProLearner: preset must be one of {sorted(PRESETS)}, got {preset!r}")
        given = {"logit_init": logit_init, "mask_lr": mask_lr, "samples": samples, "baseline": baseline,
                 "baseline_decay": baseline_decay, "normalize_advantage": normalize_advantage}  # fmt: skip
        options = {key: PRESETS[preset][key] if value is None else value for key, value in given.items()}
        samples, baseline, decay = options["samples"], options["baseline"], options["baseline_decay"]
        if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
            raise ValueError(f"MaskProLearner: samples must be an integer >= 1, got {samples!r}")
        if baseline not in BASELINES:
            raise ValueError(f"MaskProLearner: baseline must be one of {BASELINES}, got {baseline!r}")
        if baseline == "loo" and samples < 2:
            raise ValueError("MaskProLearner: baseline 'loo' (leave-one-out) needs samples >= 2")
        if not is_finite_number(decay) or not 0 <= decay < 1:
            raise ValueError(f"MaskProLearner: baseline_decay must be in [0, 1), got {decay}")
        logit_init = options["logit_init"]
        if logit_init == "budget":
            if total_steps is None:
                raise ValueError("MaskProLearner: logit_init 'budget' needs total_steps (the planned number of steps)")
            logit_init = logit_init_for_budget(total_steps, samples, n, m)
        if not is_finite_number(logit_init) or logit_init <= 0:
            raise ValueError(f"MaskProLearner: logit_init must be a positive number or 'budget', got {logit_init!r}")
        super().__init__(model, loss_fn, n, m, model_lr=model_lr, types=types, include=include, exclude=exclude,
                         seed=seed, backend=backend, compute_dtype=compute_dtype)  # fmt: skip
        self.preset, self.samples, self.baseline_kind = preset, samples, baseline
        self.baseline_decay, self.baseline = float(decay), 0.0
        self.normalize_advantage, self.advantage_square = bool(options["normalize_advantage"]), 0.0
        self.logit_init, self.mask_lr = float(logit_init), float(options["mask_lr"])
        masks = _targets.magnitude_masks(self.targets, n, m) if initial_masks == "magnitude" else initial_masks
        self.initial: dict[str, torch.Tensor] = {}
        self.logits: dict[str, nn.Parameter] = {}
        for name, module in self.targets.items():
            weight = _targets.raw_weight(module)
            initial = _targets.weight_matrix(module, masks[name].to(device=weight.device, dtype=torch.float32))
            if ops.nm_violations(initial, n, m) or int((initial != 0).sum()) != initial.numel() * n // m:
                raise ValueError(f"MaskProLearner: the initial mask of {name} is not exactly {n}:{m}")
            self.initial[name] = initial != 0
            self.logits[name] = nn.Parameter(initial * self.logit_init)
        self.mask_optimizer = torch.optim.SGD(list(self.logits.values()), lr=self.mask_lr)
        self._use_compute_dtype()

    @torch.no_grad()
    def _sample_one(self, index: int, name: str, draw: int) -> torch.Tensor:
        """Target `name`'s (the index-th) mask of draw k at this step: bool, GEMM layout, every rank's rows."""
        seed = self._sample_seed(index + draw * len(self.logits))
        args = (self.logits[name], self.n, self.m, 1.0, True, seed)
        return fsdp.sample_rows(ops.gumbel_nm_sample, *args, backend=self.backend) != 0

    def sample(self, draw: int = 0) -> dict[str, torch.Tensor]:
        """This step's sampled masks (bool, GEMM layout; draw k of the step's K), put on the model."""
        matrices = {name: self._sample_one(index, name, draw) for index, name in enumerate(self.logits)}
        self._set_matrix_masks(matrices)
        return matrices

    def _sample_when_run(self, draw: int, own: dict[str, torch.Tensor]) -> None:
        """Put draw k's masks on the model as sample() does, each drawn when its layer runs, keeping only this rank's
        rows of it in `own` (sharded: one layer's gathered mask at a time rather than every layer's)."""

        def when_run(index: int, name: str) -> torch.Tensor:
            matrix = self._sample_one(index, name, draw)
            own[name] = self._own_rows({name: matrix})[name]
            return _targets.matrix_to_weight(self.targets[name], matrix)

        for index, name in enumerate(self.logits):
            self._hooks[name].mask = functools.partial(when_run, index, name)

    def _drawn(self, draw: int, own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every target's rows of draw k, by name: those its forward drew, and the rest (layers it did not run)."""
        for index, name in enumerate(self.logits):
            if name not in own:
                own[name] = self._own_rows({name: self._sample_one(index, name, draw)})[name]
        return {name: own[name] for name in self.logits}

    def _advantages(self, losses: list[float], initial_loss: float | None) -> list[float]:
        """Each sample's advantage (lower loss: negative), updating the baseline and RMS statistics."""
        t = self.step_count + 1
        if self.baseline_kind == "loo":
            total = sum(losses)
            advantages = [loss - (total - loss) / (len(losses) - 1) for loss in losses]
        else:
            deltas = [loss - initial_loss for loss in losses]
            self.baseline = self.baseline_decay * self.baseline + (1 - self.baseline_decay) * sum(deltas) / len(deltas)
            baseline = self.baseline
            if self.baseline_kind == "ema-corrected":
                baseline /= 1 - self.baseline_decay**t
            advantages = [delta - baseline for delta in deltas]
        if self.normalize_advantage:
            square = sum(a * a for a in advantages) / len(advantages)
            self.advantage_square = self.baseline_decay * self.advantage_square + (1 - self.baseline_decay) * square
            rms = math.sqrt(self.advantage_square / (1 - self.baseline_decay**t))
            advantages = [a / rms if rms > 1e-12 else 0.0 for a in advantages]
        return advantages

    def step(self, batch) -> dict:
        """One REINFORCE step; returns the mean sampled loss, the initial mask's loss (EMA baselines), the
        mean advantage and the baseline."""
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

        def replay_rng() -> None:  # the same noise and timesteps for every mask evaluated on this batch
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)

        initial_loss = None
        if self.baseline_kind != "loo":
            with torch.no_grad():
                self._set_matrix_masks(self._full_initial())
                initial_loss = float(self.loss_fn(self.model, batch))
        train_weights = self.model_optimizer is not None
        if train_weights:
            self.model_optimizer.zero_grad(set_to_none=True)
        losses, drawn = [], []
        for draw in range(self.samples):
            if draw or initial_loss is not None:
                replay_rng()
            own: dict[str, torch.Tensor] = {}
            self._sample_when_run(draw, own)
            with torch.set_grad_enabled(train_weights):
                loss = self.loss_fn(self.model, batch)
            drawn.append(self._drawn(draw, own))
            if train_weights:
                (loss / self.samples).backward()
            losses.append(float(loss.detach()))
        # One set of losses for all ranks: each rank's batch contributes, the update is the same everywhere.
        reduced = torch.tensor([*losses, initial_loss or 0.0], dtype=torch.float64, device=self._device)
        self._average_across_ranks([reduced])
        losses = [float(x) for x in reduced[:-1]]
        initial_loss = None if initial_loss is None else float(reduced[-1])
        advantages = self._advantages(losses, initial_loss)
        self.mask_optimizer.zero_grad(set_to_none=True)
        for name, logits in self.logits.items():
            local, _ = fsdp.local_rows(logits)  # sharded: this rank's rows; log P is a sum over groups
            grad = torch.zeros_like(local)
            for advantage, sampled in zip(advantages, drawn):
                if advantage:
                    with torch.enable_grad():
                        leaf = local.detach().requires_grad_()
                        log_prob = set_log_prob(leaf, sampled[name], self.n, self.m).sum()
                        grad += advantage / self.samples * torch.autograd.grad(log_prob, leaf)[0]
            logits.grad = fsdp.rows_like(grad, logits)
        self.mask_optimizer.step()
        if train_weights:
            self._average_model_grads()
            self.model_optimizer.step()
        self._set_matrix_masks(None)
        self.step_count += 1
        info = {"loss": sum(losses) / len(losses), "advantage": sum(advantages) / len(advantages),
                "baseline": self.baseline}  # fmt: skip
        if initial_loss is not None:
            info["initial_loss"] = initial_loss
        return info

    def shard(self, blocks=None) -> None:
        """MaskLearner.shard(), and the initial masks sharded by rows as the logits. Every rank samples its rows
        and the masks are gathered for the forward; the losses (hence baselines and advantages) are averaged
        over ranks as in a DDP run; each rank computes the REINFORCE gradient of its own rows."""
        super().shard(blocks)
        mesh = next(iter(self.logits.values())).device_mesh
        self.initial = {name: fsdp.distribute_rows(mask, mesh) for name, mask in self.initial.items()}

    def _full_initial(self) -> dict[str, torch.Tensor]:
        return {name: fsdp.full_rows(mask) for name, mask in self.initial.items()}

    def _own_rows(self, matrices: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's rows of full (gathered) masks, as a copy (all of them in one process)."""
        if not self.sharded:
            return matrices
        own = {}
        for name, matrix in matrices.items():
            local, first = fsdp.local_rows(self.logits[name])
            own[name] = matrix[first : first + local.shape[0]].clone()
        return own

    @torch.no_grad()
    def masks(self) -> dict[str, torch.Tensor]:
        keep = functools.partial(top_n_mask, n=self.n, m=self.m)
        return {
            name: _targets.matrix_to_weight(module, fsdp.full_rows(self.logits[name], keep))
            for name, module in self.targets.items()
        }

    @torch.no_grad()
    def report(self, batch=None) -> dict:
        """groups, groups_flipped (final mask differs from the initial one) and their fraction; with a
        batch, the loss of the final and of the initial mask on it (the same noise for both; the global
        RNG is left as it was), i.e. the mask's loss before any finetune."""
        groups = sum(mask.numel() // self.m for mask in self.initial.values())
        flipped = 0
        for name, logits in self.logits.items():  # sharded: each rank counts its rows
            differs = top_n_mask(fsdp.local_rows(logits)[0], self.n, self.m) != fsdp.local_rows(self.initial[name])[0]
            flipped += int(differs.reshape(-1, self.m).any(-1).sum())
        flipped = int(fsdp.sum_over_ranks(torch.tensor(flipped)))
        result = {"groups": groups, "groups_flipped": flipped, "flipped_fraction": flipped / max(groups, 1)}
        if batch is not None:
            rng = torch.get_rng_state()
            result["mask_loss"] = self.loss_with_masks(batch)
            torch.set_rng_state(rng)
            initial = {
                name: _targets.matrix_to_weight(self.targets[name], mask) for name, mask in self._full_initial().items()
            }
            result["initial_mask_loss"] = self.loss_with_masks(batch, initial)
            torch.set_rng_state(rng)
        return result

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"logits.{name}": logits for name, logits in self.logits.items()}
        tensors.update({f"initial.{name}": mask for name, mask in self.initial.items()})
        return tensors

    @torch.no_grad()
    def _load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, logits in self.logits.items():
            logits.copy_(tensors[f"logits.{name}"])
            self.initial[name] = tensors[f"initial.{name}"].to(logits.device)

    def _extra_state(self) -> dict:
        return {"baseline": self.baseline, "baseline_decay": self.baseline_decay, "baseline_kind": self.baseline_kind,
                "samples": self.samples, "normalize_advantage": self.normalize_advantage,
                "advantage_square": self.advantage_square}  # fmt: skip

    def _check_extra_state(self, state: dict) -> None:
        for key in ("baseline", "advantage_square"):
            if not is_finite_number(state.get(key, 0.0)):
                raise ValueError(f"MaskProLearner: state {key} must be a finite number, got {state[key]!r}")
        if not is_finite_number(state["baseline_decay"]) or not 0 <= state["baseline_decay"] < 1:
            raise ValueError(f"MaskProLearner: state baseline_decay must be in [0, 1), got {state['baseline_decay']!r}")
        # Older files (one sample, official EMA) have no kind or sample count: those are what they used.
        mine = (self.baseline_kind, self.samples, self.normalize_advantage)
        theirs = (state.get("baseline_kind", "ema"), state.get("samples", 1), state.get("normalize_advantage", False))
        if theirs != mine:
            raise ValueError(f"MaskProLearner: state is from (baseline, samples, normalize) = {theirs}, not {mine}")

    def _load_extra_state(self, state: dict) -> None:
        self.baseline, self.baseline_decay = state["baseline"], state["baseline_decay"]
        self.advantage_square = state.get("advantage_square", 0.0)
