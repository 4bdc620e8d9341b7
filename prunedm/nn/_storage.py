"""The storage of a 2:4 sparse layer: packed values/meta/bias buffers, state-dict loading and saving, config.

The forward-path chooser (prunedm.nn._base) builds on it; it calls _weights_changed() whenever the
buffers are replaced or reloaded, so that runtime state derived from them is rebuilt."""

from __future__ import annotations

import torch
import torch.nn as nn

from prunedm.nn import _packing
from prunedm.ops import reference

_SHAPE_KEY = "prunedm_weight_shape"  # in a state dict's per-module metadata


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


class _PackedStorage(nn.Module):
    """A [rows, cols] GEMM matrix held 2:4-packed in buffers `values`, `meta` (int16) and `bias`."""

    # diffusers' from_pretrained builds dense layers and drops these buffers: prunedm.interop refuses its save.
    _diffusers_unsaveable = "prunedm 2:4 sparse layers (their packed values/meta would be dropped, the layers random)"

    def _init_storage(self, rows: int, cols: int, bias: bool, device, dtype) -> None:
        self._rows, self._cols = rows, cols  # the dense GEMM matrix [out, K]
        dtype = dtype or torch.get_default_dtype()
        if dtype not in _packing.PACKABLE_DTYPES:
            raise TypeError(f"{type(self).__name__}: dtype must be one of {_packing.PACKABLE_DTYPES}, got {dtype}")
        values, meta = _packing.empty_packed(rows, cols, dtype, device)
        self.register_buffer("values", values)
        self.register_buffer("meta", meta)
        self.register_buffer("bias", torch.zeros(rows, dtype=dtype, device=device) if bias else None)

    def _weights_changed(self) -> None:
        """Called after the buffers were replaced or reloaded."""

    def dense_matrix(self) -> torch.Tensor:
        """The masked dense GEMM matrix [out, K] (K in (kh, kw, Cin) order for convs), made on demand."""
        matrix = _packing.unpack(self.values, self.meta, self._rows, self._cols)
        return matrix if matrix.is_contiguous() else matrix.contiguous()

    @property
    def padded_shape(self) -> tuple[int, int]:
        """The stored GEMM matrix shape: [out, K] rounded up to multiples of 32."""
        return _packing.padded_shape(self._rows, self._cols)

    @property
    def dense_weight_nbytes(self) -> int:
        """Bytes the dense weight would take in the packed values' dtype."""
        return self._rows * self._cols * self.values.element_size()

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
        elif isinstance(loaded, torch.Tensor):
            self._check_logical_shape(loaded, local_metadata.get(_SHAPE_KEY), prefix, errors)
        loaded_meta = state_dict.get(prefix + "meta")
        # Checked here, once: the forward never reads metadata back to the host (no per-call sync).
        if isinstance(loaded_meta, torch.Tensor) and loaded_meta.dtype == torch.int16:
            problem = _packing.meta_problem(loaded_meta)
            if problem:
                errors.append(f"{prefix}meta: {problem}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)
        self._weights_changed()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if hasattr(destination, "_metadata"):  # for load: layers of other shapes can pad to one packed size
            destination._metadata.setdefault(prefix[:-1], {})[_SHAPE_KEY] = self._weight_shape()

    def _weight_shape(self) -> list[int]:
        return list(getattr(self, "weight_shape", (self._rows, self._cols)))

    def _check_logical_shape(self, values: torch.Tensor, saved, prefix: str, errors: list) -> None:
        shape, padded = self._weight_shape(), list(self.padded_shape)
        where = f"{type(self).__name__} {prefix[:-1] or '(root)'}"
        if saved is not None and list(saved) != shape:
            errors.append(f"{where}: the state dict holds a weight of shape {list(saved)}, this layer is {shape} "
                          f"(both pad to {padded})")  # fmt: skip
        # No shape recorded (read from a file): padding (4-groups past the last one) is zero but from another shape.
        elif not values.is_meta and (values[self._rows :].any() or values[:, -(-self._cols // 4) * 2 :].any()):
            errors.append(f"{where}: the state dict holds weights outside this layer's {shape} (padded {padded})")

    def _pack_dense_weight(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        matrix = self._matrix_from_weight(weight.detach())
        if tuple(matrix.shape) != (self._rows, self._cols):
            raise ValueError(f"weight of shape {list(weight.shape)} does not fit [{self._rows}, {self._cols}]")
        return _packing.pack(matrix.to(self.values.dtype))

    def _load_packed(self, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.values, self.meta = values, meta
        if bias is not None:
            self.bias = bias.detach().to(values.dtype).clone()
        self._weights_changed()

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
    def from_config(cls, config: dict, device=None) -> _PackedStorage:
        """An all-zero module built from sparse_config(), ready for load_state_dict."""
        kwargs = {k: v for k, v in config.items() if k != "type"}
        kwargs["dtype"] = getattr(torch, kwargs["dtype"])
        return cls(**kwargs, device=device)
