"""The shared part of SparseLinear and SparseConv2d: packed buffers, the forward-path choice, bytes, loading.

A layer holds its [out, K] GEMM matrix 2:4-packed (prunedm.nn._packing); the subclasses say how a
weight maps to that matrix and how the dense and sparse forwards run."""

from __future__ import annotations

import torch
import torch.nn as nn

from prunedm.nn import _backends, _packing
from prunedm.ops import reference

_FALLBACK_ERRORS = (RuntimeError, NotImplementedError, ValueError, TypeError)


def _check_mask(mask: torch.Tensor, expected_shape, what: str, to_matrix) -> torch.Tensor:
    """The mask as a bool matrix 2:4 along its last dim, or ValueError/TypeError saying what is wrong."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
    if tuple(mask.shape) != tuple(expected_shape):
        raise ValueError(f"mask must have the weight's shape {list(expected_shape)}, got {list(mask.shape)}")
    matrix = to_matrix(mask)
    kept = matrix.reshape(matrix.shape[0], -1, _packing.GROUP).sum(-1)
    over = (kept > 2).nonzero()
    if len(over):
        row, group = (int(v) for v in over[0])
        raise ValueError(
            f"mask is not 2:4 along {what}: {len(over)} group(s) of 4 keep more than 2 weights "
            f"(the first at output {row}, group {group}); make it with prunedm.ops.nm_mask or a 2:4 mask learner"
        )
    return matrix


def _conv_matrix(t: torch.Tensor) -> torch.Tensor:
    return reference.conv_weight_to_matrix_ref(t)  # a view op; also on bool masks and meta tensors


def _keep_mask(matrix: torch.Tensor, mask, what: str, to_matrix, mask_shape=None) -> torch.Tensor:
    """Which entries of the GEMM matrix are kept: nm_mask's magnitude 2:4, or the user's mask checked."""
    from prunedm import ops

    if mask is None:
        return ops.nm_mask(matrix.contiguous())
    mask = mask.to(matrix.device)
    return _check_mask(mask, mask_shape if mask_shape is not None else matrix.shape, what, to_matrix)


class _SparseWeight(nn.Module):
    """What SparseLinear and SparseConv2d share: packed buffers, backend choice, byte counts, loading."""

    _supports_sparse_kernel = True  # SparseConv2d: no public sparse conv kernel yet

    def _init_packed(self, rows: int, cols: int, bias: bool, device, dtype, backend: str, cache_dense: bool) -> None:
        self.backend = _backends.check_backend(backend)
        self.cache_dense = bool(cache_dense)
        self._rows, self._cols = rows, cols  # the dense GEMM matrix [out, K]
        dtype = dtype or torch.get_default_dtype()
        if dtype not in _packing.PACKABLE_DTYPES:
            raise TypeError(f"{type(self).__name__}: dtype must be one of {_packing.PACKABLE_DTYPES}, got {dtype}")
        values, meta = _packing.empty_packed(rows, cols, dtype, device)
        self.register_buffer("values", values)
        self.register_buffer("meta", meta)
        self.register_buffer("bias", torch.zeros(rows, dtype=dtype, device=device) if bias else None)
        self.last_run: tuple[str, str] | None = None  # (path, why) of the latest eager forward
        self._reset_runtime()

    # -- what the forward needs, rebuilt whenever the buffers move or are reloaded --------------------

    def _reset_runtime(self) -> None:
        self._prepared = False
        self._sparse_weight = None
        self._sparse_shape = (self._rows, self._cols)
        self._sparse_extra_bytes = 0
        self._dense_problem = ""
        self._warn_key = None  # set when the dense fallback deserves the once-per-process warning
        self._dense_cache = None

    def _apply(self, fn, recurse=True):
        self._reset_runtime()
        result = super()._apply(fn, recurse)
        self._prepare_if_cuda()
        return result

    def _prepare_if_cuda(self) -> None:
        # Eagerly, so that torch.compile right after model.to("cuda") traces the sparse kernel.
        if self.values.device.type == "cuda":
            self.prepare()

    def __getstate__(self):
        # Pickling / deepcopy carry the packed buffers, not the runtime kernel weight or caches.
        state = self.__dict__.copy()
        state.update(_prepared=False, _sparse_weight=None, _sparse_extra_bytes=0, _dense_cache=None)
        state.update(_sparse_shape=(self._rows, self._cols), _dense_problem="", _warn_key=None)
        return state

    def prepare(self) -> None:
        """Build the sparse-kernel weight for the buffers' device (eager; forward calls it when needed).

        Call it (or prunedm.nn.prepare_sparse_modules) before torch.compile on a GPU, so the
        compiled graph holds the sparse kernel; a layer not yet prepared compiles to the dense path."""
        self._reset_runtime()
        self._prepared = True
        device, dtype = self.values.device, self.values.dtype
        if self.backend == "dense":
            self._dense_problem = "backend='dense'"
            return
        if not self._supports_sparse_kernel:
            self._dense_problem = "no public 2:4 sparse conv kernel: dense conv of the masked weight (ours is pending)"
            return
        problem = _backends.torch_backend_problem(device, dtype)
        if problem is not None:
            key, reason = problem
            self._dense_problem = reason
            if device.type == "cuda" or self.backend == "torch":  # CPU + auto is silent by design
                self._warn_key = key
            return
        try:
            tensor, rows, cols, extra = _backends.build_semi_structured(self.values, self.meta, self._rows, self._cols)
        except _FALLBACK_ERRORS as exc:
            self._dense_problem = f"building torch.sparse's 2:4 weight failed: {type(exc).__name__}: {exc}"
            self._warn_key = "build-failed"
            return
        self._sparse_weight, self._sparse_shape, self._sparse_extra_bytes = tensor, (rows, cols), extra

    def _choose_path(self, x: torch.Tensor) -> tuple[str, str]:
        if self._sparse_weight is None:
            return "dense", self._dense_problem or "not prepared (compiled before prepare())"
        compute = _backends.autocast_dtype(x.device.type) or x.dtype
        if compute != self.values.dtype:
            return "dense", (
                f"computes in {str(compute).removeprefix('torch.')} but the packed weights are "
                f"{str(self.values.dtype).removeprefix('torch.')}"
            )
        if x.device != self.values.device:
            return "dense", f"input on {x.device}, weights on {self.values.device}"
        return "torch", "torch.sparse 2:4 kernel"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compiling = torch.compiler.is_compiling()
        if not compiling and not self._prepared:
            self.prepare()
        path, why = self._choose_path(x)
        if compiling:
            return self._forward_sparse(x) if path == "torch" else self._forward_dense(x)
        warn_key = self._warn_key
        if path == "torch":
            try:
                out = self._forward_sparse(x)
            except _FALLBACK_ERRORS as exc:  # a kernel that refuses this GPU or shape: run dense instead
                self._sparse_weight, self._sparse_extra_bytes = None, 0
                self._dense_problem = f"torch.sparse's 2:4 kernel raised {type(exc).__name__}: {exc}"
                path, why = "dense", self._dense_problem
                warn_key = self._warn_key = "kernel-raised"
            else:
                self.last_run = (path, why)
                return out
        elif why.startswith("computes in"):
            warn_key = f"compute-{why}"
        if warn_key is not None:
            # Warned at the first forward, not when the weights move: model.cuda().half() warns about nothing.
            _backends.warn_once(warn_key, f"prunedm sparse layers run dense (masked) weights: {why}")
        self.last_run = (path, why)
        return self._forward_dense(x)

    def _dense_weight(self) -> torch.Tensor:
        if self._dense_cache is not None:
            return self._dense_cache
        weight = self._weight_from_matrix(self.dense_matrix())
        if self.cache_dense and not torch.compiler.is_compiling():
            self._dense_cache = weight
        return weight

    # -- the packed weight -----------------------------------------------------------------------------

    def dense_matrix(self) -> torch.Tensor:
        """The masked dense GEMM matrix [out, K] (K in (kh, kw, Cin) order for convs), made on demand."""
        matrix = _packing.unpack(self.values, self.meta, self._rows, self._cols)
        return matrix if matrix.is_contiguous() else matrix.contiguous()

    @property
    def padded_shape(self) -> tuple[int, int]:
        """The stored GEMM matrix shape: [out, K] rounded up to multiples of 32."""
        return _packing.padded_shape(self._rows, self._cols)

    @property
    def weight_nbytes(self) -> int:
        """Bytes the weight really occupies now: values + meta, plus any runtime copy (cuSPARSELt, dense cache)."""
        nbytes = sum(t.numel() * t.element_size() for t in (self.values, self.meta))
        nbytes += self._sparse_extra_bytes
        if self._dense_cache is not None:
            nbytes += self._dense_cache.numel() * self._dense_cache.element_size()
        return nbytes

    @property
    def dense_weight_nbytes(self) -> int:
        """Bytes the dense weight would take in the packed values' dtype."""
        return self._rows * self._cols * self.values.element_size()

    @property
    def runs_sparse_kernel(self) -> bool | None:
        """Whether the latest eager forward ran a sparse kernel (None before any forward)."""
        return None if self.last_run is None else self.last_run[0] != "dense"

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        # A dense checkpoint of an already 2:4-pruned layer (key "weight") loads by packing it here.
        weight_key = prefix + "weight"
        if weight_key in state_dict and prefix + "values" not in state_dict:
            weight = state_dict.pop(weight_key)
            try:
                values, meta = self._pack_dense_weight(weight)
            except (ValueError, TypeError) as exc:
                errors.append(f"{weight_key}: a dense weight loads into {type(self).__name__} only when 2:4: {exc}")
            else:
                state_dict[prefix + "values"], state_dict[prefix + "meta"] = values, meta
        expected = tuple(self.values.shape)
        loaded = state_dict.get(prefix + "values")
        if isinstance(loaded, torch.Tensor) and tuple(loaded.shape) != expected:
            errors.append(
                f"{prefix}values: packed shape {list(loaded.shape)} in the checkpoint, but this {self.extra_repr()} "
                f"stores its [{self._rows}, {self._cols}] matrix as {list(expected)}"
            )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)
        self._reset_runtime()
        self._prepare_if_cuda()

    def _pack_dense_weight(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        matrix = self._matrix_from_weight(weight.detach())
        if tuple(matrix.shape) != (self._rows, self._cols):
            raise ValueError(f"weight of shape {list(weight.shape)} does not fit [{self._rows}, {self._cols}]")
        return _packing.pack(matrix.to(self.values.dtype))

    def _load_packed(self, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.values, self.meta = values, meta
        if bias is not None:
            self.bias = bias.detach().to(values.dtype).clone()
        self._reset_runtime()
        self._prepare_if_cuda()

    def sparse_config(self) -> dict:
        """JSON-able constructor arguments: enough to build an empty module that loads this one's state_dict."""
        config = {"type": type(self).__name__, **self._shape_config()}
        config.update(
            bias=self.bias is not None,
            dtype=str(self.values.dtype).removeprefix("torch."),
            backend=self.backend,
            cache_dense=self.cache_dense,
        )
        return config

    @classmethod
    def from_config(cls, config: dict, device=None) -> _SparseWeight:
        """An all-zero module built from sparse_config(), ready for load_state_dict."""
        kwargs = {k: v for k, v in config.items() if k != "type"}
        kwargs["dtype"] = getattr(torch, kwargs["dtype"])
        return cls(**kwargs, device=device)
