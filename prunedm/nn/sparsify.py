"""sparsify(): swap a model's eligible nn.Linear / nn.Conv2d for 2:4-packed SparseLinear / SparseConv2d in place.

Returns a SparsifyReport of what was converted, what was skipped and why, the bytes saved and,
after a forward, which layers ran a sparse kernel. describe/restore rebuild the layers for loading."""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn as nn

from prunedm.nn import _backends, _packing
from prunedm.nn._base import _SparseWeight
from prunedm.nn._storage import _check_mask, _conv_matrix
from prunedm.nn.modules import SparseConv2d, SparseLinear

DESCRIPTION_FORMAT = "prunedm.sparse_modules"
DESCRIPTION_VERSION = 1
SPARSE_TYPES = {"SparseLinear": SparseLinear, "SparseConv2d": SparseConv2d}

# verify=True: how far a converted layer's output may be from its masked dense result, as
# (rtol, atol relative to the output's largest magnitude). A sparse kernel accumulates in another
# order than the dense one (rounding-level differences); a wrong packing is off by O(1).
VERIFY_TOLERANCES = {
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
    torch.float32: (1e-4, 1e-5),
    torch.float64: (1e-10, 1e-12),
}


@dataclasses.dataclass
class ConvertedLayer:
    name: str
    kind: str  # "Linear" or "Conv2d"
    weight_shape: tuple[int, ...]
    padded_shape: tuple[int, int]  # the stored GEMM matrix [out, K] after padding to multiples of 32
    dtype: str
    dense_bytes: int
    packed_bytes: int


@dataclasses.dataclass
class SkippedLayer:
    name: str
    kind: str
    reason: str


@dataclasses.dataclass
class SparsifyReport:
    """What sparsify() changed. `runtime()` and str() also say, after a forward, which layers ran a sparse kernel."""

    converted: list[ConvertedLayer] = dataclasses.field(default_factory=list)
    skipped: list[SkippedLayer] = dataclasses.field(default_factory=list)
    bytes_before: int = 0  # the converted layers' dense weights
    bytes_after: int = 0  # their packed values + metadata
    model_bytes_before: int = 0  # every parameter and buffer of the model
    model_bytes_after: int = 0
    modules: dict[str, nn.Module] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def bytes_saved(self) -> int:
        return self.bytes_before - self.bytes_after

    def runtime(self) -> dict[str, tuple[str, str] | None]:
        """name -> (path, why) of each converted layer's latest eager forward; None before its first."""
        return {name: module.last_run for name, module in self.modules.items()}

    def auto_decisions(self) -> dict[str, dict[str, dict]]:
        """backend="auto": per converted layer, what auto picked for each input shape it has run
        ({"m64": {"backend": "torch", "times_ms": {...}, "source": "timed"|"cache"}}); {} before a forward."""
        return {name: module.auto_decisions() for name, module in self.modules.items() if module.backend == "auto"}

    @property
    def sparse_kernel_layers(self) -> list[str]:
        return [name for name, run in self.runtime().items() if run is not None and run[0] != "dense"]

    @property
    def dense_fallback_layers(self) -> dict[str, str]:
        return {name: run[1] for name, run in self.runtime().items() if run is not None and run[0] == "dense"}

    @property
    def weight_bytes_now(self) -> int:
        """Bytes the converted weights occupy now, runtime copies included (cuSPARSELt, dense caches)."""
        return sum(module.weight_nbytes for module in self.modules.values())

    def __str__(self) -> str:
        runtime = self.runtime()
        lines = [
            f"sparsify: {len(self.converted)} layer(s) converted to 2:4, {len(self.skipped)} skipped; "
            f"converted weights {_mib(self.bytes_before)} -> {_mib(self.bytes_after)} "
            f"({self.bytes_after / max(self.bytes_before, 1):.3f}x), "
            f"model {_mib(self.model_bytes_before)} -> {_mib(self.model_bytes_after)}",
        ]
        if self.converted:
            rows = [("layer", "kind", "weight", "stored", "dtype", "dense", "packed", "last forward")]
            for c in self.converted:
                run = runtime.get(c.name)
                if run is None:
                    ran = "not run yet"
                elif run[0] == "dense" or run[1].startswith("auto"):
                    ran = f"{run[0]}: {run[1]}"
                else:
                    ran = run[0]
                shape = "x".join(map(str, c.weight_shape))
                rows.append(
                    (
                        c.name,
                        c.kind,
                        shape,
                        "x".join(map(str, c.padded_shape)),
                        c.dtype,
                        _kib(c.dense_bytes),
                        _kib(c.packed_bytes),
                        ran,
                    )
                )
            lines += ["", "converted:", *_table(rows)]
        if self.skipped:
            rows = [("layer", "kind", "reason")] + [(s.name, s.kind, s.reason) for s in self.skipped]
            lines += ["", "skipped:", *_table(rows)]
        return "\n".join(lines)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def _kib(n: int) -> str:
    return f"{n / 2**10:.1f} KiB"


def _table(rows: list[tuple]) -> list[str]:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    out = []
    for k, r in enumerate(rows):
        out.append("  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip())
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return out


def _model_bytes(model: nn.Module) -> int:
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _kind(module: nn.Module) -> str:
    return "Linear" if isinstance(module, nn.Linear) else "Conv2d"


# Set by an earlier step that chose a layer's width (prune_channels): named when that width breaks a shape rule.
WIDTH_ORIGIN_ATTR = "prunedm_width_origin"


def nm_shape_problem(module: nn.Module, m: int = _packing.GROUP) -> str | None:
    """Why N:M groups of m cannot run along the module's input, or None: the one rule of which layers are N:M
    targets (the mask learners, finetune's keep_sparsity, sparsify). It needs a 2-D or 4-D weight, groups=1, and
    in_features (a conv's Cin, the innermost of its [Cout, kh*kw*Cin] GEMM K) a multiple of m."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() not in (2, 4):
        return "no 2-D or 4-D weight"
    groups = getattr(module, "groups", 1)
    if groups != 1:
        return f"grouped convolution (groups={groups}; N:M groups run along a groups=1 conv's Cin)"
    if weight.shape[1] % m:
        what, where = ("in_channels", "Cin") if weight.dim() == 4 else ("in_features", "the input")
        return f"shape rule: {what}={weight.shape[1]} is not a multiple of m = {m} (N:M groups run along {where})"
    return None


def ineligible_reason(module: nn.Module) -> str | None:
    """Why `module` cannot be converted (shape rule, dtype, groups, ...), or None; a shape rule broken by a
    width an earlier step chose names that step."""
    reason = _ineligible(module)
    origin = getattr(module, WIDTH_ORIGIN_ATTR, None)
    if reason is not None and reason.startswith("shape rule") and origin:
        reason += f" (width chosen by {origin}; prune with round_to='2:4' to keep it eligible)"
    return reason


def _ineligible(module: nn.Module) -> str | None:
    base = nn.Linear if isinstance(module, nn.Linear) else nn.Conv2d
    if type(module).forward is not base.forward:
        return f"{type(module).__name__} overrides {base.__name__}.forward"
    weight = module.weight
    if weight.device.type == "meta":
        return "weights on the meta device (nothing to pack)"
    if weight.dtype not in _packing.PACKABLE_DTYPES:
        return f"dtype {weight.dtype} (2:4 packing takes float16, bfloat16, float32, float64)"
    problem = nm_shape_problem(module)
    if problem is not None:
        return problem
    if isinstance(module, nn.Conv2d):
        rows, cols = module.out_channels, module.in_channels * module.kernel_size[0] * module.kernel_size[1]
    else:
        rows, cols = module.out_features, module.in_features
    dense = rows * cols * weight.element_size()
    packed = _packing.packed_nbytes(rows, cols, weight.dtype)
    if packed >= dense:
        rows_p, cols_p = _packing.padded_shape(rows, cols)
        return (
            f"shape rule: padding the [{rows}, {cols}] matrix to [{rows_p}, {cols_p}] (multiples of 32) "
            f"saves no memory ({packed} >= {dense} bytes)"
        )
    return None


def _check_masks(candidates: dict[str, nn.Module], masks: dict) -> None:

    unknown = sorted(set(masks) - set(candidates))
    if unknown:
        raise ValueError(f"sparsify: masks name module(s) that are not nn.Linear/nn.Conv2d in the model: {unknown}")
    for name, mask in masks.items():
        module = candidates[name]
        weight = module.weight
        try:
            if isinstance(module, nn.Linear):
                _check_mask(mask, weight.shape, "in_features", lambda t: t)
            else:
                _check_mask(mask, weight.shape, "Cin", _conv_matrix)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"sparsify: masks[{name!r}] ({_kind(module)} {list(weight.shape)}): {exc}") from None


def _verify_input(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(0)
    if isinstance(module, nn.Linear):
        shape = (3, module.in_features)
    else:
        size = max(8, *(d * (k - 1) + 1 for d, k in zip(module.dilation, module.kernel_size)))
        shape = (1, module.in_channels, size, size)
    return torch.randn(shape, generator=g).to(device=weight.device, dtype=weight.dtype)


def _verify(dense: nn.Module, sparse: _SparseWeight) -> str | None:
    """None when the sparse layer's output matches its masked dense result, else what went wrong."""
    masked = sparse.to_dense()
    x = _verify_input(dense, dense.weight)
    with torch.no_grad():
        expected = masked(x)
        try:
            actual = sparse(x)
        except Exception as exc:  # noqa: BLE001 - any failure means the layer must stay dense
            return f"verify failed: forward raised {type(exc).__name__}: {exc}"
    sparse.last_run = None  # the report's "last forward" is about the user's forwards
    rtol, atol = VERIFY_TOLERANCES.get(expected.dtype, (1e-2, 1e-2))
    scale = max(float(expected.abs().max()), 1.0) if expected.numel() else 1.0
    if actual.shape != expected.shape or not torch.allclose(actual, expected, rtol=rtol, atol=atol * scale):
        err = (actual - expected).abs().max().item() if actual.shape == expected.shape else float("nan")
        return f"verify failed: max |sparse - masked dense| = {err:.3g} on a random input"
    return None


def _replace(model: nn.Module, target: nn.Module, new: nn.Module) -> None:
    """Put `new` wherever `target` is registered in `model` (a module shared under two names included)."""
    for _, parent in model.named_modules(remove_duplicate=False):
        for child_name, child in list(parent._modules.items()):
            if child is target:
                setattr(parent, child_name, new)


def sparsify(
    model: nn.Module,
    pattern: str = "2:4",
    masks: dict[str, torch.Tensor] | None = None,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    backend: str = "auto",
    verify: bool = False,
) -> SparsifyReport:
    """Swap eligible nn.Linear / nn.Conv2d modules of `model` for SparseLinear / SparseConv2d, in place.

    pattern: only "2:4". masks: {module name: bool mask of the dense weight's shape ([Cout, Cin, kh,
    kw] for convs), 2:4 along the input dim / Cin}; when given, only the named modules are converted
    (a module without a mask is skipped, never magnitude-pruned behind the user's back); when None,
    every eligible module gets magnitude 2:4 (prunedm.ops.nm_mask). filter_fn(module, name) -> False
    skips a module. Eligible: groups=1, input dim / Cin a multiple of 4, a float dtype, and padding
    to multiples of 32 must still save memory. verify=True runs each converted layer once on a
    small random input against its masked dense result and keeps it dense on a mismatch.
    Weights become frozen buffers: the result is for inference."""
    if pattern != "2:4":
        raise ValueError(f"sparsify: pattern must be '2:4' (the only pattern sparse tensor cores run), got {pattern!r}")
    _backends.check_backend(backend)
    masks = dict(masks or {})
    report = SparsifyReport(model_bytes_before=_model_bytes(model))

    candidates: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, _SparseWeight):
            continue
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            candidates[name] = module
    _check_masks(candidates, masks)  # before anything changes: a bad mask leaves the model untouched

    for name, module in candidates.items():
        kind = _kind(module)
        if module is model:
            reason = f"the model itself is an {type(module).__name__}: use Sparse{kind}.from_dense"
        elif filter_fn is not None and not filter_fn(module, name):
            reason = "filter_fn returned False"
        elif masks and name not in masks:
            reason = "no mask given (masks= names the modules to convert)"
        else:
            reason = ineligible_reason(module)
        if reason is not None:
            report.skipped.append(SkippedLayer(name, kind, reason))
            continue
        cls = SparseLinear if kind == "Linear" else SparseConv2d
        sparse = cls.from_dense(module, masks.get(name), backend=backend)
        if verify:
            problem = _verify(module, sparse)
            if problem is not None:
                report.skipped.append(SkippedLayer(name, kind, problem))
                continue
        _replace(model, module, sparse)
        report.modules[name] = sparse
        report.converted.append(
            ConvertedLayer(
                name=name,
                kind=kind,
                weight_shape=tuple(module.weight.shape),
                padded_shape=sparse.padded_shape,
                dtype=str(module.weight.dtype).removeprefix("torch."),
                dense_bytes=module.weight.numel() * module.weight.element_size(),
                packed_bytes=sparse.values.numel() * sparse.values.element_size() + sparse.meta.numel() * 2,
            )
        )
    report.bytes_before = sum(c.dense_bytes for c in report.converted)
    report.bytes_after = sum(c.packed_bytes for c in report.converted)
    report.model_bytes_after = _model_bytes(model)
    return report


def sparse_modules(model: nn.Module) -> dict[str, _SparseWeight]:
    """name -> SparseLinear / SparseConv2d of every converted layer in `model`."""
    return {name: m for name, m in model.named_modules() if isinstance(m, _SparseWeight)}


def prepare_sparse_modules(model: nn.Module) -> None:
    """Build every sparse layer's kernel weight now (eagerly), e.g. after model.to("cuda") and before torch.compile."""
    for module in sparse_modules(model).values():
        module.prepare()


def describe_sparse_modules(model: nn.Module) -> dict:
    """A JSON-able description of `model`'s sparse layers, for restore_sparse_modules.

    Saved beside the state_dict (whose sparse layers hold `values`, `meta`, `bias`), it lets a
    freshly built dense model take the packed weights without recompressing."""
    return {
        "format": DESCRIPTION_FORMAT,
        "version": DESCRIPTION_VERSION,
        "modules": {name: m.sparse_config() for name, m in sparse_modules(model).items()},
    }


def restore_sparse_modules(model: nn.Module, description: dict) -> dict[str, _SparseWeight]:
    """Swap the layers named in `description` for empty SparseLinear / SparseConv2d of the recorded shapes.

    Each named module must be the matching nn.Linear / nn.Conv2d (or already the sparse layer).
    The new layers sit on the replaced module's device and hold zeros until model.load_state_dict()
    fills `values`, `meta` and `bias` (a meta-device model works with load_state_dict(assign=True)).
    Returns name -> the new module."""
    if description.get("format") != DESCRIPTION_FORMAT:
        raise ValueError(
            f"restore_sparse_modules: description format {description.get('format')!r}, expected {DESCRIPTION_FORMAT!r}"
        )
    if description.get("version") != DESCRIPTION_VERSION:
        raise ValueError(
            f"restore_sparse_modules: description version {description.get('version')!r}, "
            f"this prunedm reads {DESCRIPTION_VERSION}"
        )
    restored = {}
    for name, config in description["modules"].items():
        try:
            current = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"restore_sparse_modules: the model has no module {name!r}") from None
        sparse = rebuild_sparse_module(config, current, name)
        if sparse is not current:
            _replace(model, current, sparse)
        restored[name] = sparse
    return restored


def describe_sparse_module(module: _SparseWeight) -> dict:
    """One sparse layer's JSON description (its sparse_config()): a structure hook for save/load."""
    return module.sparse_config()


def rebuild_sparse_module(config: dict, current: nn.Module, name: str = "", check_shape: bool = True) -> _SparseWeight:
    """The empty sparse layer `config` describes, on `current`'s device (meta included), to take its place.

    `current` is the nn.Linear / nn.Conv2d a freshly built model has there (checked to match; with
    check_shape=False only its kind is checked, for save/load of pruned models, whose config-built
    modules have the unpruned shapes), or already the sparse layer (returned as is). Its `values`,
    `meta`, `bias` come from load_state_dict."""
    cls = SPARSE_TYPES.get(config.get("type"))
    if cls is None:
        raise ValueError(f"restore_sparse_modules: {name!r} has unknown type {config.get('type')!r}")
    if isinstance(current, cls):
        return current
    _check_matches(name, current, cls, config, check_shape)
    device = next(iter(current.parameters()), torch.empty(0)).device
    return cls.from_config(config, device=device)


def _check_matches(name: str, current: nn.Module, cls: type, config: dict, check_shape: bool = True) -> None:
    if not check_shape:
        ok = isinstance(current, nn.Linear if cls is SparseLinear else nn.Conv2d)
    elif cls is SparseLinear:
        ok = isinstance(current, nn.Linear) and (current.in_features, current.out_features) == (
            config["in_features"],
            config["out_features"],
        )
    else:
        ok = isinstance(current, nn.Conv2d) and (
            current.in_channels,
            current.out_channels,
            list(current.kernel_size),
        ) == (config["in_channels"], config["out_channels"], list(config["kernel_size"]))
    if not ok or (check_shape and (getattr(current, "bias", None) is not None) != config["bias"]):
        raise ValueError(
            f"restore_sparse_modules: {name!r} is {current!r}, which does not match the description {config}"
        )
