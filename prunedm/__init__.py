"""prunedm: make diffusion models (UNets and DiTs) smaller and faster.

Structural pruning, learned N:M (2:4) masks, and sparse inference on sparse tensor cores; every
op has a reference implementation in prunedm.ops.reference and fast C++/CUDA/Triton paths."""

from prunedm import nn, ops, pruning, structural
from prunedm._version import __version__
from prunedm.nn import SparseConv2d, SparseLinear, SparsifyReport, sparsify
from prunedm.ops import extension_info
from prunedm.pruning import learn_depth_keep, prune_channels, prune_depth
from prunedm.serialization import load_pretrained, register_structure_hook, save_pretrained

__all__ = [
    "SparseConv2d",
    "SparseLinear",
    "SparsifyReport",
    "__version__",
    "extension_info",
    "learn_depth_keep",
    "load_pretrained",
    "nn",
    "ops",
    "pruning",
    "prune_channels",
    "prune_depth",
    "register_structure_hook",
    "save_pretrained",
    "sparsify",
    "structural",
]

# Load the compiled ops now, so torch.ops.prunedm.* exist after `import prunedm` (when built).
from prunedm import _ext as _ext_module  # noqa: E402

_ext_module._load()
