"""prunedm: make diffusion models (UNets and DiTs) smaller and faster.

Structural pruning, learned N:M (2:4) masks, and sparse inference on sparse tensor cores; every
op has a reference implementation in prunedm.ops.reference and fast C++/CUDA/Triton paths."""

from prunedm import ops
from prunedm._ext import extension_info

__version__ = "0.1.0"
__all__ = ["extension_info", "ops", "__version__"]

# Load the compiled ops now, so torch.ops.prunedm.* exist after `import prunedm` (when built).
from prunedm import _ext as _ext_module  # noqa: E402

_ext_module._load()
