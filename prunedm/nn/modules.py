"""SparseLinear and SparseConv2d: drop-in layers whose weights are stored 2:4-packed (values + int16 metadata).

No dense copy of a weight is kept (unless cache_dense=True, or backend="auto" timed dense fastest):
the `dense` path decompresses per call, `torch` runs torch.sparse's 2:4 kernels on sm80+ GPUs,
`prunedm` runs prunedm's own mma.sp kernels. See prunedm/nn/__init__.py."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair, _reverse_repeat_tuple

from prunedm import ops
from prunedm.nn import _autotune, _packing
from prunedm.nn._base import _any_autocast, _SparseWeight
from prunedm.nn._storage import _conv_matrix, _keep_mask
from prunedm.ops import _backends as op_table

# A layout op, the same implementation on every device: resolved once, outside any torch.compile trace.
_MATRIX_TO_CONV = op_table.resolve("matrix_to_conv_weight", "auto", torch.device("cpu")).fn


class SparseLinear(_SparseWeight):
    """nn.Linear with a 2:4-sparse weight stored packed: buffers `values` [Rp, Kp/2], `meta` [Rp, Kp/16] int16, `bias`.

    Rp, Kp are out_features and in_features rounded up to multiples of 32 (zero padding, sliced off).
    SparseLinear(in, out) builds an all-zero module to load a state_dict into; from_dense() converts."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype: torch.dtype | None = None,
        backend: str = "auto",
        cache_dense: bool = False,
    ) -> None:
        super().__init__()
        if in_features % _packing.GROUP:
            raise ValueError(
                f"SparseLinear: in_features ({in_features}) must be a multiple of 4: 2:4 groups run along the input dim"
            )
        self.in_features, self.out_features = in_features, out_features
        self._init_packed(out_features, in_features, bias, device, dtype, backend, cache_dense)

    @classmethod
    def from_dense(
        cls, linear: nn.Linear, mask: torch.Tensor | None = None, backend: str = "auto", *, cache_dense: bool = False
    ) -> SparseLinear:
        """Pack `linear`'s weight under `mask` (bool, the weight's shape, 2:4 along in_features).

        mask=None keeps the 2 largest |w| of every 4 (prunedm.ops.nm_mask). The weights become
        frozen buffers (inference); `linear` is not modified."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"SparseLinear.from_dense: expected an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight.detach()
        if weight.dtype not in _packing.PACKABLE_DTYPES:
            raise TypeError(
                f"SparseLinear.from_dense: weight dtype must be one of {_packing.PACKABLE_DTYPES}, got {weight.dtype}"
            )
        module = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            device="meta",
            dtype=weight.dtype,
            backend=backend,
            cache_dense=cache_dense,
        )
        keep = _keep_mask(weight, mask, "in_features", lambda t: t)
        values, meta = _packing.pack(torch.where(keep, weight, 0))
        module._load_packed(values, meta, linear.bias)
        return module

    def _shape_config(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features}

    def _matrix_from_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight

    def _weight_from_matrix(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix

    def _forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._dense_weight(), self.bias)

    def _fixed_dense_forward(self):
        weight, buffers = self._runtime.dense_cache, self._buffers  # the bias read per call: it may be reassigned
        if weight is None:
            return self._forward_dense
        return lambda x: F.linear(x, weight, buffers["bias"])

    def _input_key(self, x: torch.Tensor) -> tuple | None:
        rows = x.numel() // self.in_features
        return (_autotune.batch_bucket(rows),) if isinstance(rows, int) else None

    def _layer_signature(self) -> str:
        dtype = str(self.values.dtype).removeprefix("torch.")
        return f"linear {self.out_features}x{self.in_features} bias={self.bias is not None} {dtype}"

    def _sparse_operands(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x as the [M, K padded] matrix the sparse kernels take, and the bias they can fuse (None if padded rows)."""
        return self._runtime.gemm_operands(self, x.reshape(-1, self.in_features), self.out_features)

    def _forward_sparse(self, x: torch.Tensor) -> torch.Tensor:
        x2d, fused_bias = self._sparse_operands(x)
        y = self._runtime.torch_gemm(self, x2d, fused_bias, self.out_features, self._input_key(x))
        return y.reshape(*x.shape[:-1], self.out_features)

    def _prunedm_call(self, x: torch.Tensor, kernel) -> torch.Tensor:
        """kernel(x_in, values, meta, bias) on x cast and padded to the packed K; the bias added after if rows are."""
        rows_p, cols_p = self.values.shape[0], self.values.shape[1] * 2
        x_in = x.to(self.values.dtype)
        if cols_p != self.in_features:
            x_in = F.pad(x_in, (0, cols_p - self.in_features))
        fuse_bias = rows_p == self.out_features
        with torch.autocast(x.device.type, enabled=False):
            y = kernel(x_in, self.values, self.meta, self.bias if fuse_bias else None)
            if not fuse_bias:
                y = y[..., : self.out_features]
                if self.bias is not None:
                    y = y + self.bias
        return y

    def _prunedm_checked(self, x: torch.Tensor) -> torch.Tensor:
        """The first call of a signature: through prunedm.ops, which checks every argument."""
        backend = self._runtime.prunedm_kernel
        return self._prunedm_call(x, lambda *args: ops.sparse_linear_2to4(*args, backend=backend))

    def _forward_prunedm(self, x: torch.Tensor) -> torch.Tensor:
        fn = self._runtime.prunedm_impl.fn
        return self._prunedm_call(x, lambda x_in, values, meta, bias: fn(x_in, values, meta, bias, "none", None))

    def _prunedm_forward(self, x: torch.Tensor):
        """The forward fixed for x's signature: the kernel called directly when nothing needs adapting."""
        rows_p, cols_p = self.values.shape[0], self.values.shape[1] * 2
        if (x.dtype, cols_p, rows_p) != (self.values.dtype, self.in_features, self.out_features) or _any_autocast():
            return self._forward_prunedm
        fn, buffers = self._runtime.prunedm_impl.fn, self._buffers  # buffers read per call: they may be reassigned
        return lambda x: fn(x, buffers["values"], buffers["meta"], buffers["bias"], "none", None)

    def to_dense(self) -> nn.Linear:
        """An equivalent nn.Linear holding the masked dense weight."""
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None, device="meta")
        linear.weight = nn.Parameter(self.dense_matrix().clone())
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.clone())
        return linear

    def extra_repr(self) -> str:
        rows_p, cols_p = self.padded_shape
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"backend={self.backend!r}, packed=[{rows_p}, {cols_p}]"
        )


class SparseConv2d(_SparseWeight):
    """nn.Conv2d (groups=1) with a 2:4-sparse weight, groups of 4 along Cin, stored as its GEMM matrix packed.

    The matrix is [Cout, kh*kw*Cin] in (kh, kw, Cin) order (prunedm.ops.conv_weight_to_matrix),
    padded to multiples of 32. torch.sparse has no 2:4 convolution: backend="prunedm" (and "auto" on
    a GPU, when timed faster) runs prunedm's sparse implicit-GEMM conv; a 1x1, stride-1, unpadded conv
    is also a linear over NHWC pixels, which backend="torch" (and "auto") runs through torch.sparse's
    2:4 GEMM (cuSPARSELt); otherwise the dense conv of the masked weight runs, the weight rebuilt per call."""

    _prunedm_op = "sparse_conv2d_2to4"

    @property
    def _supports_torch_kernel(self) -> bool:
        """1x1, stride 1, no padding (any dilation, groups=1): out[n, :, h, w] = W x[n, :, h, w] + b, a GEMM."""
        unpadded = self.padding in ("valid", "same") or self.padding == (0, 0)
        return self.kernel_size == (1, 1) and self.stride == (1, 1) and unpadded

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype: torch.dtype | None = None,
        backend: str = "auto",
        cache_dense: bool = False,
    ) -> None:
        super().__init__()
        if groups != 1:
            raise ValueError(f"SparseConv2d: only groups=1 convolutions are supported, got groups={groups}")
        if in_channels % _packing.GROUP:
            raise ValueError(
                f"SparseConv2d: in_channels ({in_channels}) must be a multiple of 4: 2:4 groups run along Cin"
            )
        if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(f"SparseConv2d: unknown padding_mode {padding_mode!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.dilation = _pair(kernel_size), _pair(stride), _pair(dilation)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.groups, self.padding_mode = groups, padding_mode
        if isinstance(self.padding, str):
            self._reversed_padding_repeated_twice = [0, 0] * 2
            if self.padding == "same":
                for d, k, i in zip(self.dilation, self.kernel_size, (1, 0)):
                    total = d * (k - 1)
                    self._reversed_padding_repeated_twice[2 * i] = total // 2
                    self._reversed_padding_repeated_twice[2 * i + 1] = total - total // 2
        else:
            self._reversed_padding_repeated_twice = list(_reverse_repeat_tuple(self.padding, 2))
        kh, kw = self.kernel_size
        self._init_packed(out_channels, kh * kw * in_channels, bias, device, dtype, backend, cache_dense)

    @classmethod
    def from_dense(
        cls, conv: nn.Conv2d, mask: torch.Tensor | None = None, backend: str = "auto", *, cache_dense: bool = False
    ) -> SparseConv2d:
        """Pack `conv`'s weight under `mask` (bool [Cout, Cin, kh, kw], 2:4 along Cin).

        mask=None keeps the 2 largest |w| of every 4 consecutive input channels at each (kh, kw)."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"SparseConv2d.from_dense: expected an nn.Conv2d, got {type(conv).__name__}")
        weight = conv.weight.detach()
        if weight.dtype not in _packing.PACKABLE_DTYPES:
            raise TypeError(
                f"SparseConv2d.from_dense: weight dtype must be one of {_packing.PACKABLE_DTYPES}, got {weight.dtype}"
            )
        module = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
            conv.padding_mode,
            device="meta",
            dtype=weight.dtype,
            backend=backend,
            cache_dense=cache_dense,
        )
        matrix = _conv_matrix(weight)
        keep = _keep_mask(matrix, mask, "Cin", _conv_matrix, weight.shape)
        values, meta = _packing.pack(torch.where(keep, matrix, 0))
        module._load_packed(values, meta, conv.bias)
        return module

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        return (self.out_channels, self.in_channels, *self.kernel_size)

    def _shape_config(self) -> dict:
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": list(self.kernel_size),
            "stride": list(self.stride),
            "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
            "dilation": list(self.dilation),
            "groups": self.groups,
            "padding_mode": self.padding_mode,
        }

    def _matrix_from_weight(self, weight: torch.Tensor) -> torch.Tensor:
        if tuple(weight.shape) != self.weight_shape:
            raise ValueError(f"weight of shape {list(weight.shape)} is not {list(self.weight_shape)}")
        return _conv_matrix(weight)

    def _weight_from_matrix(self, matrix: torch.Tensor) -> torch.Tensor:
        if self.kernel_size == (1, 1):
            # A view with NCHW strides: the permuted layout would read as channels_last for 1x1 kernels
            # and pick another conv algorithm than the dense layer's.
            return matrix.reshape(self.weight_shape)
        return _MATRIX_TO_CONV(matrix, list(self.weight_shape))

    def _forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        weight = self._dense_weight()
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(x, weight, self.bias, self.stride, _pair(0), self.dilation, self.groups)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def _fixed_dense_forward(self):
        weight, buffers = self._runtime.dense_cache, self._buffers
        if weight is None or self.padding_mode != "zeros":
            return self._forward_dense
        stride, padding, dilation = self.stride, self.padding, self.dilation
        return lambda x: F.conv2d(x, weight, buffers["bias"], stride, padding, dilation, 1)

    def _output_hw(self, height: int, width: int) -> tuple[int, int]:
        if isinstance(self.padding, str):
            left_w, right_w, top, bottom = self._reversed_padding_repeated_twice
            pads = (top + bottom, left_w + right_w)
        else:
            pads = (2 * self.padding[0], 2 * self.padding[1])
        return tuple(
            (size + pad - d * (k - 1) - 1) // s + 1
            for size, pad, d, k, s in zip((height, width), pads, self.dilation, self.kernel_size, self.stride)
        )

    def _input_key(self, x: torch.Tensor) -> tuple | None:
        batch = x.shape[0] if x.dim() == 4 else 1
        height, width = x.shape[-2], x.shape[-1]
        if not all(isinstance(v, int) for v in (batch, height, width)):
            return None
        out_h, out_w = self._output_hw(height, width)
        return (height, width, _autotune.batch_bucket(max(batch * out_h * out_w, 0)))

    def _layer_signature(self) -> str:
        dtype = str(self.values.dtype).removeprefix("torch.")
        kh, kw = self.kernel_size
        return (
            f"conv2d {self.out_channels}x{self.in_channels}x{kh}x{kw} s{list(self.stride)} p{self.padding} "
            f"d{list(self.dilation)} {self.padding_mode} bias={self.bias is not None} {dtype}"
        )

    def _sparse_operands(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A 1x1 conv's GEMM operand: x's pixels in NHWC order as [N*H*W, Cin padded], and the fusable bias."""
        pixels = x if x.dim() == 4 else x.unsqueeze(0)
        return self._runtime.gemm_operands(self, pixels.permute(0, 2, 3, 1).reshape(-1, self.in_channels),
                                           self.out_channels)  # fmt: skip

    def _forward_sparse(self, x: torch.Tensor) -> torch.Tensor:
        """A 1x1 conv as torch.sparse's 2:4 GEMM over NHWC pixels; the output in x's memory format."""
        pixels = x if x.dim() == 4 else x.unsqueeze(0)
        n, _, h, w = pixels.shape
        x2d, fused_bias = self._sparse_operands(pixels)
        y = self._runtime.torch_gemm(self, x2d, fused_bias, self.out_channels, self._input_key(x))
        y = y.reshape(n, h, w, self.out_channels).permute(0, 3, 1, 2)  # channels_last memory
        if pixels.is_contiguous() or not pixels.is_contiguous(memory_format=torch.channels_last):
            y = y.contiguous()
        return y if x.dim() == 4 else y.squeeze(0)

    def _prunedm_call(self, x: torch.Tensor, kernel) -> torch.Tensor:
        """kernel(x_in, values, meta, shape, bias, stride, padding, dilation) on x (padded when the mode asks)."""
        if x.dim() == 3:  # an unbatched [C, H, W] input, as nn.Conv2d accepts
            return self._prunedm_call(x.unsqueeze(0), kernel).squeeze(0)
        x_in = x.to(self.values.dtype)
        padding = self.padding
        if isinstance(padding, str) or self.padding_mode != "zeros":
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x_in = F.pad(x_in, self._reversed_padding_repeated_twice, mode=mode)
            padding = (0, 0)
        rows_p = self.values.shape[0]
        fuse_bias = rows_p == self.out_channels
        with torch.autocast(x.device.type, enabled=False):
            # Padded output channels are computed (zero rows) and sliced off.
            shape = (rows_p, *self.weight_shape[1:])
            bias = self.bias if fuse_bias else None
            y = kernel(x_in, self.values, self.meta, shape, bias, self.stride, padding, self.dilation)
            if not fuse_bias:
                y = y[:, : self.out_channels]
                if self.bias is not None:
                    y = y + self.bias.reshape(1, -1, 1, 1)
        return y

    def _prunedm_checked(self, x: torch.Tensor) -> torch.Tensor:
        """The first call of a signature: through prunedm.ops, which checks every argument."""
        backend = self._runtime.prunedm_kernel

        def kernel(x_in, values, meta, shape, bias, stride, padding, dilation):
            return ops.sparse_conv2d_2to4(
                x_in, values, meta, shape, bias, stride=stride, padding=padding, dilation=dilation, backend=backend
            )

        return self._prunedm_call(x, kernel)

    def _forward_prunedm(self, x: torch.Tensor) -> torch.Tensor:
        fn = self._runtime.prunedm_impl.fn
        return self._prunedm_call(x, lambda *args: fn(*args, "none", None))

    def _prunedm_forward(self, x: torch.Tensor):
        """The forward fixed for x's signature: the kernel called directly when nothing needs adapting."""
        rows_p = self.values.shape[0]
        simple = x.dim() == 4 and not isinstance(self.padding, str) and self.padding_mode == "zeros"
        if not simple or (x.dtype, rows_p) != (self.values.dtype, self.out_channels) or _any_autocast():
            return self._forward_prunedm
        fn, buffers = self._runtime.prunedm_impl.fn, self._buffers  # buffers read per call: they may be reassigned
        shape, stride, padding, dilation = (rows_p, *self.weight_shape[1:]), self.stride, self.padding, self.dilation
        return lambda x: fn(x, buffers["values"], buffers["meta"], shape, buffers["bias"], stride, padding, dilation,
                            "none", None)  # fmt: skip

    def _prunedm_shape_problem(self) -> tuple[str, str] | None:
        if self.values.shape[1] * 2 != self._cols:
            kh, kw = self.kernel_size
            return "prunedm-conv-padded-k", (
                f"prunedm's sparse conv needs kh*kw*Cin ({kh}*{kw}*{self.in_channels} = {self._cols}) in multiples "
                "of 32 (the packed matrix is padded here): dense conv of the masked weight"
            )
        return None

    def to_dense(self) -> nn.Conv2d:
        """An equivalent nn.Conv2d holding the masked dense weight."""
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.bias is not None,
            self.padding_mode,
            device="meta",
        )
        conv.weight = nn.Parameter(self._weight_from_matrix(self.dense_matrix()).clone())
        if self.bias is not None:
            conv.bias = nn.Parameter(self.bias.clone())
        return conv

    def extra_repr(self) -> str:
        rows_p, cols_p = self.padded_shape
        text = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}"
        )
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        if self.padding_mode != "zeros":
            text += f", padding_mode={self.padding_mode!r}"
        return text + f", bias={self.bias is not None}, backend={self.backend!r}, packed=[{rows_p}, {cols_p}]"
