"""The path chooser of a sparse layer and everything it derives from the packed buffers at run time, in one
object (_Runtime): reset by replacing it, never pickled or copied with the layer.

prepare() works out which sparse paths can run on the buffers' device (once per device/dtype); the first
call of each input signature picks its path (explicit backend, the auto timing, or dense) and fixes the
callable that later calls with that signature run, with no policy work."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prunedm import ops
from prunedm.nn import _autotune, _backends, _cusparselt
from prunedm.ops import _backends as op_table

FALLBACK_ERRORS = (RuntimeError, NotImplementedError, ValueError, TypeError)
PATH_TEXT = {"torch": "torch.sparse 2:4 kernel", "prunedm": "prunedm 2:4 kernel", "dense": "dense"}
_KERNEL_NAME = {"torch": "torch.sparse's 2:4 kernel", "prunedm": "prunedm's 2:4 kernel"}
MAX_SIGNATURES = 1024  # distinct input signatures remembered per layer (then the memo starts again)


def ampere_class_problem(device: torch.device) -> tuple[str, str] | None:
    """(key, reason) when backend="auto" does not offer prunedm's mma.sp kernels on `device`: compute
    capability 9.x. They are Ampere-class kernels (warp-level mma.sp, cp.async; no wgmma.sp, no TMA), so on
    Hopper linears go to torch.sparse (cuSPARSELt) or dense and convs dense (1x1 convs as cuSPARSELt GEMMs);
    backend="prunedm" still runs them there. Other capabilities are timed as usual."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    if major != 9:
        return None
    return "prunedm-ampere-class", (
        f"sm_{major}{minor}: prunedm's mma.sp kernels are Ampere-class (no wgmma.sp), not an auto candidate here: "
        "linears run torch.sparse (cuSPARSELt) or dense, convs dense (1x1 convs as cuSPARSELt GEMMs); "
        "backend='prunedm' runs them anyway"
    )


def key_text(key: tuple) -> str:
    *spatial, bucket = key
    return ("x".join(map(str, spatial)) + ":" if spatial else "") + f"m{bucket}"


class _Runtime:
    """Runtime state of one sparse layer (the layer passes itself to each method; nothing here refers to it)."""

    def __init__(self, rows: int, cols: int) -> None:
        self.prepared = False
        self.fixed = None  # set once every input runs dense: one forward for all signatures
        self.calls: dict[tuple, tuple] = {}  # input signature -> (forward, (path, why))
        self.paths: list[str] = []  # sparse paths that can run here: "torch", "prunedm"
        self.sparse_weight = None
        self.sparse_shape = (rows, cols)
        self.sparse_extra_bytes = 0
        self.cslt_packed = None  # cuSPARSELt's compressed weight, run with a searched alg_id
        self.cslt_params: dict[tuple, tuple[int, int, int]] = {}  # input key -> (alg_id, split_k, mode)
        self.prunedm_kernel = "extension"  # the prunedm.ops backend of the "prunedm" path
        self.prunedm_impl = None  # its implementation in prunedm.ops' table (arguments checked per signature)
        self.dense_problem = ""
        self.warn_key = None  # set when the dense fallback deserves the once-per-process warning
        self.dense_cache = None
        # backend="auto": input key -> chosen path, and the cache entry it came from.
        self.auto: dict[tuple, str] = {}
        self.auto_entries: dict[tuple, dict] = {}
        self.autotune_context = ""
        self.timing = True
        self.keep_dense = False  # auto picked dense somewhere: keep the dense weight (speed over memory)
        self.auto_note = ""  # why auto leaves a path out on this device (said in every auto decision's reason)

    # -- which paths can run on the buffers' device ----------------------------------------------------

    def prepare(self, layer, device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        """Work out the sparse paths for the buffers' device and dtype (device/dtype: a seam for the tests)."""
        self.prepared = True
        device = layer.values.device if device is None else device
        dtype = layer.values.dtype if dtype is None else dtype
        if layer.backend == "dense":
            self.dense_problem = "backend='dense'"
            return
        problems = {}
        if layer.backend in ("torch", "auto"):
            problems["torch"] = self._prepare_torch(layer, device, dtype)
        # auto considers prunedm's kernels on CUDA only: their CPU twin is exact, not fast.
        if layer.backend == "prunedm" or (layer.backend == "auto" and device.type == "cuda"):
            left_out = ampere_class_problem(device) if layer.backend == "auto" else None
            if left_out is not None:
                problems["prunedm"], self.auto_note = left_out, left_out[1]
            else:
                problems["prunedm"] = self._prepare_prunedm(layer, device, dtype)
        if self.paths:
            if layer.backend == "auto":
                self._load_auto_decisions(layer, device)
            return
        if layer.backend == "auto":
            fallback = problems.get("prunedm") or problems["torch"]
            primary = problems["torch"] if layer._supports_torch_kernel else fallback
        else:
            primary = problems[layer.backend]
        key, reason = primary
        self.dense_problem = reason
        # Explicit backends always warn; auto warns on GPUs only (CPU + auto is silent by design) and
        # not for convs (no sparse kernel but prunedm's); a weight that fails to build always warns.
        if layer.backend != "auto" or key == "build-failed" or (device.type == "cuda" and layer._supports_torch_kernel):
            self.warn_key = key

    def _prepare_torch(self, layer, device: torch.device, dtype: torch.dtype) -> tuple[str, str] | None:
        if not layer._supports_torch_kernel:
            return "torch-no-conv", (
                "torch.sparse has no 2:4 convolution kernel: dense conv of the masked weight "
                "(backend='prunedm' runs prunedm's sparse implicit-GEMM conv)"
            )
        problem = _backends.torch_backend_problem(device, dtype)
        if problem is not None:
            return problem
        try:
            built = _backends.build_semi_structured(layer.values, layer.meta, layer._rows, layer._cols)
            tensor, rows, cols, extra = built
        except FALLBACK_ERRORS as exc:
            return "build-failed", f"building torch.sparse's 2:4 weight failed: {type(exc).__name__}: {exc}"
        self.sparse_weight, self.sparse_shape, self.sparse_extra_bytes = tensor, (rows, cols), extra
        if getattr(tensor, "BACKEND", None) == "cusparselt" and _cusparselt.mm_available():
            self.cslt_packed = tensor.packed
            _cusparselt._registered_op()  # registered eagerly, never while torch.compile traces
        self.paths.append("torch")
        return None

    def _prepare_prunedm(self, layer, device: torch.device, dtype: torch.dtype) -> tuple[str, str] | None:
        problem = layer._prunedm_shape_problem() or _backends.prunedm_backend_problem(
            device, dtype, getattr(layer, "in_channels", None)
        )
        if problem is not None:
            return problem
        # The kernel itself (CUDA, or its C++ twin on CPU), never a silent switch to the reference.
        kernel, _ = ops.sparse_kernel_backend(device)  # "extension", "nvrtc" (CUDA without a CUDA build) or None
        self.prunedm_kernel = kernel or "reference"
        try:
            self.prunedm_impl = op_table.resolve(layer._prunedm_op, self.prunedm_kernel, device, dtype)
        except RuntimeError as exc:
            return "prunedm-unavailable", f"prunedm's sparse kernels cannot run on {device}: {exc}"
        self.paths.append("prunedm")
        return None

    # -- the torch path's GEMM (linears, and 1x1 convs over NHWC pixels) ---------------------------------

    def gemm_operands(self, layer, x2d: torch.Tensor, out_features: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x2d [M, K] as the [M, K padded] matrix torch.sparse's kernel takes, and the bias it can fuse (None when
        the packed rows are padded: torch_gemm adds it after slicing)."""
        rows, cols = self.sparse_shape
        x2d = x2d.to(layer.values.dtype).contiguous()
        if cols != x2d.shape[1]:
            x2d = F.pad(x2d, (0, cols - x2d.shape[1]))
        return x2d, layer.bias if rows == out_features else None

    def torch_gemm(self, layer, x2d: torch.Tensor, fused_bias, out_features: int, key: tuple | None) -> torch.Tensor:
        """x2d (from gemm_operands) @ W^T + bias -> [M, out_features]: cuSPARSELt with the searched parameters for
        `key`, else the torch.sparse tensor (CUTLASS)."""
        rows, _ = self.sparse_shape
        with torch.autocast(x2d.device.type, enabled=False):
            if self.cslt_packed is not None:
                params = self.cslt_params.get(key, _cusparselt.DEFAULT_PARAMS)
                y = _cusparselt.linear(self.cslt_packed, x2d, fused_bias, rows, params)
            else:
                y = F.linear(x2d, self.sparse_weight, fused_bias)
            if rows != out_features:
                y = y[:, :out_features]
                if layer.bias is not None:
                    y = y + layer.bias
        return y

    # -- which path an input takes ----------------------------------------------------------------------

    def static_path(self, layer, x: torch.Tensor) -> str:
        """The path without timing (torch.compile tracing, CUDA graph capture): explicit backend, cached auto
        decision, or dense when auto has none for this shape."""
        if not self.paths or not layer._runs_as_packed(x):
            return "dense"
        if layer.backend != "auto":
            return self.paths[0]
        if not self.timing:
            return "torch" if "torch" in self.paths else self.paths[0]
        key = layer._input_key(x)
        return "dense" if key is None else self.auto.get(key, "dense")

    def choose_path(self, layer, x: torch.Tensor) -> tuple[str, str]:
        if not self.paths:
            return "dense", self.dense_problem or "not prepared (compiled before prepare())"
        mismatch = layer._mismatch(x)
        if mismatch is not None:
            return "dense", mismatch
        if layer.backend != "auto":
            if self.paths[0] == "torch" and self.cslt_packed is not None:
                self.ensure_cslt_params(layer, x)
            return self.paths[0], PATH_TEXT[self.paths[0]]
        if not self.timing:
            path = self.static_path(layer, x)
            return path, f"auto without timing ({_autotune.ENV_AUTOTUNE}=0): {PATH_TEXT.get(path, path)}"
        if x.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return self.static_path(layer, x), "auto during CUDA graph capture: cached decision, dense when none"
        key = layer._input_key(x)
        path = self.auto.get(key)
        if path is None:
            path = self._decide(layer, x, key)
            if not self.paths:  # every sparse path raised while being timed
                return "dense", self.dense_problem
        entry = self.auto_entries.get(key, {})
        times = ", ".join(f"{name} {ms:.4g} ms" for name, ms in sorted(entry.get("times_ms", {}).items()))
        source = "cached" if entry.get("source") == "cache" else "timed"
        note = f"; {self.auto_note}" if self.auto_note else ""
        return path, f"auto picked {path} for {key_text(key)} ({source}: {times}){note}"

    def remember(self, signature: tuple, forward, last_run: tuple[str, str]) -> None:
        if len(self.calls) >= MAX_SIGNATURES:
            self.calls.clear()
        self.calls[signature] = (forward, last_run)

    # -- backend="auto": timing and its cache -----------------------------------------------------------

    def _load_auto_decisions(self, layer, device: torch.device) -> None:
        self.timing = _autotune.timing_enabled()
        self.autotune_context = _autotune.context_key(device)
        candidates = {"dense", *self.paths}
        for entry in _autotune.CACHE.layer_entries(self.autotune_context, layer._layer_signature()).values():
            key = tuple(entry.get("input", ()))
            if not key:
                continue
            if entry.get("cslt") and self.cslt_packed is not None:
                self.cslt_params[key] = tuple(entry["cslt"])
            if entry.get("backend") in candidates and set(entry.get("times_ms", {})) >= candidates:
                self.auto[key] = entry["backend"]
                self.auto_entries[key] = {**entry, "source": "cache"}
                self.keep_dense |= entry["backend"] == "dense"

    def ensure_cslt_params(self, layer, x: torch.Tensor) -> tuple[int, int, int] | None:
        """cuSPARSELt's searched (alg_id, split_k, split_k_mode) for x's bucket: memory, disk cache, or a search now."""
        key = layer._input_key(x)
        if key in self.cslt_params:
            return self.cslt_params[key]
        context = self.autotune_context or _autotune.context_key(x.device)
        entry = _autotune.CACHE.get(context, layer._layer_signature(), key_text(key)) or {}
        params = tuple(entry["cslt"]) if entry.get("cslt") else None
        if params is None:
            x2d, bias = layer._sparse_operands(x)
            params = _cusparselt.search(self.cslt_packed, x2d, bias)
            if params is not None:
                _autotune.CACHE.put(
                    context, layer._layer_signature(), key_text(key), {"input": list(key), "cslt": list(params)}
                )
        self.cslt_params[key] = params or _cusparselt.DEFAULT_PARAMS
        return params

    def _decide(self, layer, x: torch.Tensor, key: tuple) -> str:
        """auto: the cached decision for this shape, or time dense and every sparse path on x and keep the fastest."""
        signature, text = layer._layer_signature(), key_text(key)
        candidates = {"dense", *self.paths}
        entry = _autotune.CACHE.get(self.autotune_context, signature, text) or {}
        if entry.get("backend") in candidates and set(entry.get("times_ms", {})) >= candidates:
            if entry.get("cslt") and self.cslt_packed is not None:
                self.cslt_params[key] = tuple(entry["cslt"])
            entry["source"] = "cache"
        else:
            if "torch" in self.paths and self.cslt_packed is not None:
                params = self.ensure_cslt_params(layer, x)
                if params is not None:
                    entry["cslt"] = list(params)
            # Dense is timed as auto would run it: from a kept dense weight, not decompressed per call.
            self.dense_cache = layer._dense_weight_uncached()
            fns = {"dense": lambda: layer._forward_dense(x)}
            fns.update({path: (lambda p=path: layer._run_checked(p, x)) for path in self.paths})
            times, errors = _autotune.time_candidates(fns, x.device)
            if "dense" in errors:
                layer._forward_dense(x)  # raises the real error
            for path, error in errors.items():
                self.drop_path(path, error)
            entry.update(
                input=list(key),
                backend=_autotune.pick_fastest(times),
                times_ms={name: round(ms, 6) for name, ms in times.items()},
            )
            entry.pop("source", None)
            _autotune.CACHE.put(self.autotune_context, signature, text, entry, timed=True)
            entry["source"] = "timed"
        path = entry["backend"]
        self.auto[key], self.auto_entries[key] = path, entry
        self.keep_dense |= path == "dense"
        if not (self.keep_dense or layer.cache_dense):
            self.dense_cache = None
        return path

    def drop_path(self, path: str, error: str) -> None:
        """A sparse path that raised on this GPU or shape: never take it again for this layer."""
        if path not in self.paths:
            return
        self.paths.remove(path)
        self.calls.clear()  # signatures fixed on that path choose again
        if path == "torch":
            self.sparse_weight, self.sparse_extra_bytes, self.cslt_packed = None, 0, None
        self.auto = {k: v for k, v in self.auto.items() if v != path}
        self.dense_problem = f"{_KERNEL_NAME[path]} raised {error}"
        self.warn_key = "kernel-raised"
        _backends.warn_once(self.warn_key, f"prunedm sparse layers run dense (masked) weights: {self.dense_problem}")
