"""Triton kernels of prunedm's ops, installed as prunedm.kernels (setup.py's package_dir), never as a top-level
`kernels`: that name is Hugging Face's package, which transformers imports when it finds one."""

from __future__ import annotations

if __name__ == "kernels":
    # This folder was found as a top-level `kernels` because the current directory is the repository root.
    # Running our code as Hugging Face's `kernels` broke every diffusers import with transformers installed
    # (issue 19). Hand the import to the real package when one is installed, else look absent: no file, no
    # version and an empty path, which transformers and diffusers read as "not installed".
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _elsewhere = [entry for entry in _sys.path if _os.path.abspath(entry or _os.curdir) != _root]
    _spec = _machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is not None and _spec.loader is not None:
        _module = _util.module_from_spec(_spec)
        _sys.modules["kernels"] = _module  # the import statement returns what sys.modules holds at the end
        _spec.loader.exec_module(_module)
    else:
        __file__ = None
        __path__ = []
else:
    from prunedm.kernels._api import (
        compress_2to4,
        decompress_2to4,
        gumbel_nm_sample,
        gumbel_pattern_sample,
        nm_mask,
        nm_violations,
    )

    __all__ = [
        "compress_2to4",
        "decompress_2to4",
        "gumbel_nm_sample",
        "gumbel_pattern_sample",
        "nm_mask",
        "nm_violations",
    ]
