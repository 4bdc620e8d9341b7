"""What SparseLinear and SparseConv2d share: packed storage (nn._storage) composed with one runtime object
(nn._runtime) that chooses the forward path once per input signature and holds every runtime cache.

The subclasses say how a weight maps to the [out, K] GEMM matrix and how the dense and sparse forwards run."""

from __future__ import annotations

import torch

from prunedm import interop
from prunedm.nn import _backends
from prunedm.nn._runtime import FALLBACK_ERRORS, _Runtime, key_text
from prunedm.nn._storage import _PackedStorage

_any_autocast = torch._C._is_any_autocast_enabled


class _SparseWeight(_PackedStorage):
    """Packed buffers (the storage) plus `_runtime`, the path chooser and its caches (never saved or copied)."""

    _supports_torch_kernel = True  # SparseConv2d: torch.sparse has no 2:4 convolution
    _prunedm_op = "sparse_linear_2to4"  # the prunedm.ops op of the "prunedm" backend

    def _init_packed(self, rows: int, cols: int, bias: bool, device, dtype, backend: str, cache_dense: bool) -> None:
        self.backend = _backends.check_backend(backend)
        self.cache_dense = bool(cache_dense)
        self._init_storage(rows, cols, bias, device, dtype)
        interop.install_save_guard_if_loaded()  # diffusers' own save_pretrained would drop the packed weights
        self.last_run: tuple[str, str] | None = None  # (path, why) of the latest eager forward
        self._reset_runtime()

    # -- the runtime object, rebuilt whenever the buffers move or are reloaded ----------------------------

    def _reset_runtime(self) -> None:
        self._runtime = _Runtime(self._rows, self._cols)

    def _weights_changed(self) -> None:
        self._reset_runtime()
        self._prepare_if_cuda()

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
        # Pickling / deepcopy carry the packed buffers, not the runtime (kernel weights, caches, closures).
        state = self.__dict__.copy()
        state["_runtime"] = _Runtime(self._rows, self._cols)
        return state

    def prepare(self) -> None:
        """Build the sparse-kernel weight for the buffers' device (eager; forward calls it when needed).

        Call it (or prunedm.nn.prepare_sparse_modules) before torch.compile on a GPU, so the
        compiled graph holds the sparse kernel; a layer not yet prepared compiles to the dense path.
        With backend="auto" it also loads the timing decisions already cached for this layer's shape."""
        self._reset_runtime()
        self._runtime.prepare(self)

    # -- what a forward depends on ------------------------------------------------------------------------

    def _input_key(self, x: torch.Tensor) -> tuple | None:
        """What the auto decision depends on besides the layer: the batch bucket (and, for convs, H and W)."""
        raise NotImplementedError

    def _layer_signature(self) -> str:
        raise NotImplementedError

    def _prunedm_shape_problem(self) -> tuple[str, str] | None:
        return None

    _key_text = staticmethod(key_text)

    def _runs_as_packed(self, x: torch.Tensor) -> bool:
        """Whether x can take a sparse path at all: it computes in the weights' dtype, on their device."""
        compute = _backends.autocast_dtype(x.device.type) or x.dtype
        return compute == self.values.dtype and x.device == self.values.device

    def _mismatch(self, x: torch.Tensor) -> str | None:
        """Why x cannot take a sparse path whatever the backend: compute dtype or device differ from the weights'."""
        if self._runs_as_packed(x):
            return None
        compute = _backends.autocast_dtype(x.device.type) or x.dtype
        if compute != self.values.dtype:
            return (
                f"computes in {str(compute).removeprefix('torch.')} but the packed weights are "
                f"{str(self.values.dtype).removeprefix('torch.')}"
            )
        return f"input on {x.device}, weights on {self.values.device}"

    def _run(self, path: str, x: torch.Tensor) -> torch.Tensor:
        if path == "torch":
            return self._forward_sparse(x)
        if path == "prunedm":
            return self._forward_prunedm(x)
        return self._forward_dense(x)

    def _run_checked(self, path: str, x: torch.Tensor) -> torch.Tensor:
        """_run, with the prunedm kernel's arguments checked (prunedm.ops): for an input not run before."""
        return self._prunedm_checked(x) if path == "prunedm" else self._run(path, x)

    # -- the forward ----------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        runtime = self._runtime
        if torch.compiler.is_compiling():
            return self._run(runtime.static_path(self, x), x)
        fixed = runtime.fixed
        if fixed is not None and self.last_run is not None:  # last_run reset (e.g. by verify): record it again
            return fixed(x)
        amp = _any_autocast() and _backends.autocast_dtype(x.device.type)  # False, or the autocast dtype here
        signature = (x.shape, x.dtype, x.device, x.requires_grad and torch.is_grad_enabled(), amp)
        call = runtime.calls.get(signature)
        if call is None:
            return self._first_call(x, signature)
        if self.last_run is not call[1]:  # nn.Module.__setattr__ costs microseconds: only when it changes
            self.last_run = call[1]
        return call[0](x)

    def _first_call(self, x: torch.Tensor, signature: tuple) -> torch.Tensor:
        """Choose the path for a new input signature, run it once (checked), and fix its callable."""
        if not self._runtime.prepared:
            self.prepare()
        runtime = self._runtime
        path, why = runtime.choose_path(self, x)
        warn_key = runtime.warn_key
        capturing = x.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if path != "dense":
            try:
                out = self._run_checked(path, x)
            except FALLBACK_ERRORS as exc:  # a kernel that refuses this GPU or shape: run dense instead
                runtime.drop_path(path, f"{type(exc).__name__}: {exc}")
                path, why, warn_key = "dense", runtime.dense_problem, None
            else:
                self.last_run = (path, why)
                if not capturing:
                    forward = self._prunedm_forward(x) if path == "prunedm" else self._forward_sparse
                    runtime.remember(signature, forward, self.last_run)
                return out
        elif why.startswith("computes in"):
            warn_key = f"compute-{why}"
        if warn_key is not None and not why.startswith("auto"):
            # Warned at the first forward, not when the weights move: model.cuda().half() warns about nothing.
            _backends.warn_once(warn_key, f"prunedm sparse layers run dense (masked) weights: {why}")
        self.last_run = (path, why)
        out = self._forward_dense(x)
        if not runtime.paths:  # dense whatever the input, with the same reason: later calls skip the choice
            runtime.fixed = self._fixed_dense_forward()
        elif not capturing:
            runtime.remember(signature, self._fixed_dense_forward(), self.last_run)
        return out

    def _static_path(self, x: torch.Tensor) -> str:
        return self._runtime.static_path(self, x)

    def auto_decisions(self) -> dict[str, dict]:
        """backend="auto": {input key ("m64", or "32x32:m512" for convs): {"backend", "times_ms", "source"}}."""
        runtime = self._runtime
        return {
            key_text(key): {
                "backend": path,
                "times_ms": dict(runtime.auto_entries.get(key, {}).get("times_ms", {})),
                "source": runtime.auto_entries.get(key, {}).get("source", ""),
            }
            for key, path in runtime.auto.items()
        }

    # -- the dense weight -----------------------------------------------------------------------------------

    def _dense_weight_uncached(self) -> torch.Tensor:
        if self._runtime.dense_cache is not None:
            return self._runtime.dense_cache
        return self._weight_from_matrix(self.dense_matrix())

    def _dense_weight(self) -> torch.Tensor:
        runtime = self._runtime
        if runtime.dense_cache is not None:
            return runtime.dense_cache
        weight = self._weight_from_matrix(self.dense_matrix())
        if (self.cache_dense or runtime.keep_dense) and not torch.compiler.is_compiling():
            runtime.dense_cache = weight
        return weight

    # -- what the weight costs ------------------------------------------------------------------------------

    @property
    def weight_nbytes(self) -> int:
        """Bytes the weight really occupies now: values + meta, plus any runtime copy (cuSPARSELt, dense cache)."""
        nbytes = sum(t.numel() * t.element_size() for t in (self.values, self.meta))
        nbytes += self._runtime.sparse_extra_bytes
        cache = self._runtime.dense_cache
        if cache is not None:
            nbytes += cache.numel() * cache.element_size()
        return nbytes

    @property
    def runs_sparse_kernel(self) -> bool | None:
        """Whether the latest eager forward ran a sparse kernel (None before any forward)."""
        return None if self.last_run is None else self.last_run[0] != "dense"
