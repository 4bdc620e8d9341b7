"""Optional dependencies imported where a feature needs them, so a plain `pip install prunedm` imports
and a missing package is one ImportError naming the extra that brings it."""

from __future__ import annotations

import importlib

# The optional packages prunedm uses and the extra that installs each: a plain `pip install prunedm` has none.
EXTRAS = dict.fromkeys(("torch_pruning", "diffusers", "cleanfid", "sklearn", "matplotlib"), "models")
PACKAGE_NAMES = {"torch_pruning": "torch-pruning", "cleanfid": "clean-fid", "sklearn": "scikit-learn"}


def optional_import(module: str, feature: str):
    """`module`, imported; when it is not installed, an ImportError naming the extra that brings it
    ("prune_channels needs torch-pruning: pip install 'prunedm[models]'"), so a plain install imports
    prunedm and fails only in the feature that needs the package."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        top = module.split(".")[0]
        if exc.name is None or exc.name.split(".")[0] != top:
            raise  # the package is there but something it imports is broken: show that, not a hint
        package = PACKAGE_NAMES.get(top, top)
        raise ImportError(f"{feature} needs {package}: pip install 'prunedm[{EXTRAS.get(top, 'models')}]'") from exc
