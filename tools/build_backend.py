"""PEP 517 backend: setuptools, building prunedm._C against the torch of the target environment.

Under pip's build isolation the backend runs with the target environment's interpreter but with
its site-packages hidden. A compiled extension must match the torch it will load next to, so we
ask that interpreter (outside the isolation) where its torch lives and put that first on the
path. Only when the target has no torch is torch requested for the isolated environment."""

from __future__ import annotations

import os
import subprocess
import sys

from setuptools import build_meta as _orig
from setuptools.build_meta import *  # noqa: F401,F403  (the PEP 517 hooks we do not override)

_ISOLATION_VARS = ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME")


def _target_torch_site() -> str | None:
    env = {k: v for k, v in os.environ.items() if k not in _ISOLATION_VARS}
    # `python -c` puts the cwd (the source tree being built) first on sys.path: drop it, so that the
    # probe imports the target's torch and never a torch.py (or other module) lying in that tree.
    probe = (
        "import os, sys; sys.path[:] = [p for p in sys.path if p not in ('', '.', os.getcwd())]; "
        "import torch; print(os.path.dirname(os.path.dirname(torch.__file__)))"
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    site = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    return site or None


def _use_target_torch() -> bool:
    try:
        import torch  # noqa: F401

        return True
    except ImportError:
        pass
    site = _target_torch_site()
    if site is None:
        return False
    sys.path.insert(0, site)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (site, os.environ.get("PYTHONPATH", "")) if p)
    return True


# Every PEP 517 hook runs in a fresh process that imports this module, and setup.py imports
# torch, so the target's torch goes on the path here, before any hook runs setuptools.
_TARGET_HAS_TORCH = _use_target_torch()


def get_requires_for_build_wheel(config_settings=None):
    return _orig.get_requires_for_build_wheel(config_settings) + ([] if _TARGET_HAS_TORCH else ["torch"])


def get_requires_for_build_editable(config_settings=None):
    return _orig.get_requires_for_build_editable(config_settings) + ([] if _TARGET_HAS_TORCH else ["torch"])
