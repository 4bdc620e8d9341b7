"""The shared part of SparseLinear and SparseConv2d: the forward-path choice over packed storage (nn._storage).

The subclasses say how a weight maps to the [out, K] GEMM matrix and how the dense and sparse forwards run."""

from __future__ import annotations

import torch

from prunedm import interop
from prunedm.nn import _autotune, _backends, _cusparselt
from prunedm.nn._storage import _PackedStorage

_FALLBACK_ERRORS = (RuntimeError, NotImplementedError, ValueError, TypeError)
_PATH_TEXT = {"torch": "torch.sparse 2:4 kernel", "prunedm": "prunedm 2:4 kernel", "dense": "dense"}
_KERNEL_NAME = {"torch": "torch.sparse's 2:4 kernel", "prunedm": "prunedm's 2:4 kernel"}


class _SparseWeight(_PackedStorage):
    """What SparseLinear and SparseConv2d share: packed buffers, backend choice, byte counts, loading."""

    _supports_torch_kernel = True  # SparseConv2d: torch.sparse has no 2:4 convolution
    _prunedm_op = "sparse_linear_2to4"  # the prunedm.ops function of the "prunedm" backend

    def _init_packed(self, rows: int, cols: int, bias: bool, device, dtype, backend: str, cache_dense: bool) -> None:
        self.backend = _backends.check_backend(backend)
        self.cache_dense = bool(cache_dense)
        self._init_storage(rows, cols, bias, device, dtype)
        interop.install_save_guard_if_loaded()  # diffusers' own save_pretrained would drop the packed weights
        self.last_run: tuple[str, str] | None = None  # (path, why) of the latest eager forward
        self._reset_runtime()

    # -- what the forward needs, rebuilt whenever the buffers move or are reloaded --------------------

    def _reset_runtime(self) -> None:
        self._prepared = False
        self._fixed_forward = None  # set once every input runs dense: the forward without the path choice
        self._paths: list[str] = []  # sparse paths that can run here: "torch", "prunedm"
        self._sparse_weight = None
        self._sparse_shape = (self._rows, self._cols)
        self._sparse_extra_bytes = 0
        self._cslt_packed = None  # cuSPARSELt's compressed weight, run with a searched alg_id
        self._cslt_params: dict[tuple, tuple[int, int, int]] = {}  # input key -> (alg_id, split_k, mode)
        self._prunedm_fn = None
        self._prunedm_kernel = "extension"
        self._dense_problem = ""
        self._warn_key = None  # set when the dense fallback deserves the once-per-process warning
        self._dense_cache = None
        # backend="auto": input key -> chosen path, and the cache entry it came from.
        self._auto: dict[tuple, str] = {}
        self._auto_entries: dict[tuple, dict] = {}
        self._autotune_context = ""
        self._timing = True
        self._keep_dense = False  # auto picked dense somewhere: keep the dense weight (speed over memory)

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
        # Pickling / deepcopy carry the packed buffers, not the runtime kernel weight or caches.
        state = self.__dict__.copy()
        state.update(_prepared=False, _paths=[], _sparse_weight=None, _sparse_extra_bytes=0, _dense_cache=None)
        state.update(_fixed_forward=None)  # it holds this layer's tensors, not the copy's
        state.update(_sparse_shape=(self._rows, self._cols), _dense_problem="", _warn_key=None, _prunedm_fn=None)
        state.update(_cslt_packed=None, _cslt_params={}, _auto={}, _auto_entries={}, _keep_dense=False)
        return state

    def prepare(self) -> None:
        """Build the sparse-kernel weight for the buffers' device (eager; forward calls it when needed).

        Call it (or prunedm.nn.prepare_sparse_modules) before torch.compile on a GPU, so the
        compiled graph holds the sparse kernel; a layer not yet prepared compiles to the dense path.
        With backend="auto" it also loads the timing decisions already cached for this layer's shape."""
        self._reset_runtime()
        self._prepared = True
        device, dtype = self.values.device, self.values.dtype
        if self.backend == "dense":
            self._dense_problem = "backend='dense'"
            return
        problems = {}
        if self.backend in ("torch", "auto"):
            problems["torch"] = self._prepare_torch(device, dtype)
        # auto considers prunedm's kernels on CUDA only: their CPU twin is exact, not fast.
        if self.backend == "prunedm" or (self.backend == "auto" and device.type == "cuda"):
            problems["prunedm"] = self._prepare_prunedm(device, dtype)
        if self._paths:
            if self.backend == "auto":
                self._load_auto_decisions(device)
            return
        if self.backend == "auto":
            primary = problems["torch"] if self._supports_torch_kernel else problems.get("prunedm") or problems["torch"]
        else:
            primary = problems[self.backend]
        key, reason = primary
        self._dense_problem = reason
        # Explicit backends always warn; auto warns on GPUs only (CPU + auto is silent by design) and
        # not for convs (no sparse kernel but prunedm's); a weight that fails to build always warns.
        if self.backend != "auto" or key == "build-failed" or (device.type == "cuda" and self._supports_torch_kernel):
            self._warn_key = key

    def _prepare_torch(self, device: torch.device, dtype: torch.dtype) -> tuple[str, str] | None:
        if not self._supports_torch_kernel:
            return "torch-no-conv", (
                "torch.sparse has no 2:4 convolution kernel: dense conv of the masked weight "
                "(backend='prunedm' runs prunedm's sparse implicit-GEMM conv)"
            )
        problem = _backends.torch_backend_problem(device, dtype)
        if problem is not None:
            return problem
        try:
            tensor, rows, cols, extra = _backends.build_semi_structured(self.values, self.meta, self._rows, self._cols)
        except _FALLBACK_ERRORS as exc:
            return "build-failed", f"building torch.sparse's 2:4 weight failed: {type(exc).__name__}: {exc}"
        self._sparse_weight, self._sparse_shape, self._sparse_extra_bytes = tensor, (rows, cols), extra
        if getattr(tensor, "BACKEND", None) == "cusparselt" and _cusparselt.mm_available():
            self._cslt_packed = tensor.packed
            _cusparselt._registered_op()  # registered eagerly, never while torch.compile traces
        self._paths.append("torch")
        return None

    def _prepare_prunedm(self, device: torch.device, dtype: torch.dtype) -> tuple[str, str] | None:
        problem = self._prunedm_shape_problem() or _backends.prunedm_backend_problem(
            device, dtype, getattr(self, "in_channels", None)
        )
        if problem is not None:
            return problem
        ops = _backends.prunedm_sparse_ops()
        self._prunedm_fn = getattr(ops, self._prunedm_op)
        # The kernel itself (CUDA, or its C++ twin on CPU), never a silent switch to the reference.
        kernel, _ = ops.sparse_kernel_backend(device)  # "extension", "nvrtc" (CUDA without a CUDA build) or None
        self._prunedm_kernel = kernel or "reference"
        self._paths.append("prunedm")
        return None

    def _prunedm_shape_problem(self) -> tuple[str, str] | None:
        return None

    # -- which path a forward takes -----------------------------------------------------------------

    def _input_key(self, x: torch.Tensor) -> tuple | None:
        """What the auto decision depends on besides the layer: the batch bucket (and, for convs, H and W)."""
        raise NotImplementedError

    def _layer_signature(self) -> str:
        raise NotImplementedError

    @staticmethod
    def _key_text(key: tuple) -> str:
        *spatial, bucket = key
        return ("x".join(map(str, spatial)) + ":" if spatial else "") + f"m{bucket}"

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

    def _static_path(self, x: torch.Tensor) -> str:
        """The path without timing (torch.compile tracing, CUDA graph capture): explicit backend, cached auto
        decision, or dense when auto has none for this shape."""
        if not self._paths or not self._runs_as_packed(x):
            return "dense"
        if self.backend != "auto":
            return self._paths[0]
        if not self._timing:
            return "torch" if "torch" in self._paths else self._paths[0]
        key = self._input_key(x)
        return "dense" if key is None else self._auto.get(key, "dense")

    def _choose_path(self, x: torch.Tensor) -> tuple[str, str]:
        if not self._paths:
            return "dense", self._dense_problem or "not prepared (compiled before prepare())"
        mismatch = self._mismatch(x)
        if mismatch is not None:
            return "dense", mismatch
        if self.backend != "auto":
            if self._paths[0] == "torch" and self._cslt_packed is not None:
                self._ensure_cslt_params(x)
            return self._paths[0], _PATH_TEXT[self._paths[0]]
        if not self._timing:
            path = self._static_path(x)
            return path, f"auto without timing ({_autotune.ENV_AUTOTUNE}=0): {_PATH_TEXT.get(path, path)}"
        if x.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return self._static_path(x), "auto during CUDA graph capture: cached decision, dense when none"
        key = self._input_key(x)
        path = self._auto.get(key)
        if path is None:
            path = self._decide(x, key)
            if not self._paths:  # every sparse path raised while being timed
                return "dense", self._dense_problem
        entry = self._auto_entries.get(key, {})
        times = ", ".join(f"{name} {ms:.4g} ms" for name, ms in sorted(entry.get("times_ms", {}).items()))
        source = "cached" if entry.get("source") == "cache" else "timed"
        return path, f"auto picked {path} for {self._key_text(key)} ({source}: {times})"

    def _load_auto_decisions(self, device: torch.device) -> None:
        self._timing = _autotune.timing_enabled()
        self._autotune_context = _autotune.context_key(device)
        candidates = {"dense", *self._paths}
        for entry in _autotune.CACHE.layer_entries(self._autotune_context, self._layer_signature()).values():
            key = tuple(entry.get("input", ()))
            if not key:
                continue
            if entry.get("cslt") and self._cslt_packed is not None:
                self._cslt_params[key] = tuple(entry["cslt"])
            if entry.get("backend") in candidates and set(entry.get("times_ms", {})) >= candidates:
                self._auto[key] = entry["backend"]
                self._auto_entries[key] = {**entry, "source": "cache"}
                self._keep_dense |= entry["backend"] == "dense"

    def _ensure_cslt_params(self, x: torch.Tensor) -> tuple[int, int, int] | None:
        """cuSPARSELt's searched (alg_id, split_k, split_k_mode) for x's bucket: memory, disk cache, or a search now."""
        key = self._input_key(x)
        if key in self._cslt_params:
            return self._cslt_params[key]
        context = self._autotune_context or _autotune.context_key(x.device)
        entry = _autotune.CACHE.get(context, self._layer_signature(), self._key_text(key)) or {}
        params = tuple(entry["cslt"]) if entry.get("cslt") else None
        if params is None:
            x2d, bias = self._sparse_operands(x)
            params = _cusparselt.search(self._cslt_packed, x2d, bias)
            if params is not None:
                _autotune.CACHE.put(
                    context, self._layer_signature(), self._key_text(key), {"input": list(key), "cslt": list(params)}
                )
        self._cslt_params[key] = params or _cusparselt.DEFAULT_PARAMS
        return params

    def _decide(self, x: torch.Tensor, key: tuple) -> str:
        """auto: the cached decision for this shape, or time dense and every sparse path on x and keep the fastest."""
        signature, text = self._layer_signature(), self._key_text(key)
        candidates = {"dense", *self._paths}
        entry = _autotune.CACHE.get(self._autotune_context, signature, text) or {}
        if entry.get("backend") in candidates and set(entry.get("times_ms", {})) >= candidates:
            if entry.get("cslt") and self._cslt_packed is not None:
                self._cslt_params[key] = tuple(entry["cslt"])
            entry["source"] = "cache"
        else:
            if "torch" in self._paths and self._cslt_packed is not None:
                params = self._ensure_cslt_params(x)
                if params is not None:
                    entry["cslt"] = list(params)
            # Dense is timed as auto would run it: from a kept dense weight, not decompressed per call.
            self._dense_cache = self._dense_weight_uncached()
            fns = {"dense": lambda: self._forward_dense(x)}
            fns.update({path: (lambda p=path: self._run(p, x)) for path in self._paths})
            times, errors = _autotune.time_candidates(fns, x.device)
            if "dense" in errors:
                self._forward_dense(x)  # raises the real error
            for path, error in errors.items():
                self._drop_path(path, error)
            entry.update(
                input=list(key),
                backend=_autotune.pick_fastest(times),
                times_ms={name: round(ms, 6) for name, ms in times.items()},
            )
            entry.pop("source", None)
            _autotune.CACHE.put(self._autotune_context, signature, text, entry, timed=True)
            entry["source"] = "timed"
        path = entry["backend"]
        self._auto[key], self._auto_entries[key] = path, entry
        self._keep_dense |= path == "dense"
        if not (self._keep_dense or self.cache_dense):
            self._dense_cache = None
        return path

    def _drop_path(self, path: str, error: str) -> None:
        """A sparse path that raised on this GPU or shape: never take it again for this layer."""
        if path not in self._paths:
            return
        self._paths.remove(path)
        if path == "torch":
            self._sparse_weight, self._sparse_extra_bytes, self._cslt_packed = None, 0, None
        self._auto = {k: v for k, v in self._auto.items() if v != path}
        self._dense_problem = f"{_KERNEL_NAME[path]} raised {error}"
        self._warn_key = "kernel-raised"
        _backends.warn_once(self._warn_key, f"prunedm sparse layers run dense (masked) weights: {self._dense_problem}")

    def _run(self, path: str, x: torch.Tensor) -> torch.Tensor:
        if path == "torch":
            return self._forward_sparse(x)
        if path == "prunedm":
            return self._forward_prunedm(x)
        return self._forward_dense(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self._run(self._static_path(x), x)
        fixed = self._fixed_forward
        if fixed is not None and self.last_run is not None:  # last_run reset (e.g. by verify): record it again
            return fixed(x)
        if not self._prepared:
            self.prepare()
        path, why = self._choose_path(x)
        warn_key = self._warn_key
        if path != "dense":
            try:
                out = self._run(path, x)
            except _FALLBACK_ERRORS as exc:  # a kernel that refuses this GPU or shape: run dense instead
                self._drop_path(path, f"{type(exc).__name__}: {exc}")
                path, why, warn_key = "dense", self._dense_problem, None
            else:
                self.last_run = (path, why)
                return out
        elif why.startswith("computes in"):
            warn_key = f"compute-{why}"
        if warn_key is not None and not why.startswith("auto"):
            # Warned at the first forward, not when the weights move: model.cuda().half() warns about nothing.
            _backends.warn_once(warn_key, f"prunedm sparse layers run dense (masked) weights: {why}")
        self.last_run = (path, why)
        out = self._forward_dense(x)
        if not self._paths:  # dense whatever the input, with the same reason: later calls skip the choice
            self._fixed_forward = self._fixed_dense_forward()
        return out

    def auto_decisions(self) -> dict[str, dict]:
        """backend="auto": {input key ("m64", or "32x32:m512" for convs): {"backend", "times_ms", "source"}}."""
        return {
            self._key_text(key): {
                "backend": path,
                "times_ms": dict(self._auto_entries.get(key, {}).get("times_ms", {})),
                "source": self._auto_entries.get(key, {}).get("source", ""),
            }
            for key, path in self._auto.items()
        }

    def _dense_weight_uncached(self) -> torch.Tensor:
        if self._dense_cache is not None:
            return self._dense_cache
        return self._weight_from_matrix(self.dense_matrix())

    def _dense_weight(self) -> torch.Tensor:
        if self._dense_cache is not None:
            return self._dense_cache
        weight = self._weight_from_matrix(self.dense_matrix())
        if (self.cache_dense or self._keep_dense) and not torch.compiler.is_compiling():
            self._dense_cache = weight
        return weight

    # -- what the weight costs ----------------------------------------------------------------------

    @property
    def weight_nbytes(self) -> int:
        """Bytes the weight really occupies now: values + meta, plus any runtime copy (cuSPARSELt, dense cache)."""
        nbytes = sum(t.numel() * t.element_size() for t in (self.values, self.meta))
        nbytes += self._sparse_extra_bytes
        if self._dense_cache is not None:
            nbytes += self._dense_cache.numel() * self._dense_cache.element_size()
        return nbytes

    @property
    def runs_sparse_kernel(self) -> bool | None:
        """Whether the latest eager forward ran a sparse kernel (None before any forward)."""
        return None if self.last_run is None else self.last_run[0] != "dense"
