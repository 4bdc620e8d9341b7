"""Running from the repository root: the top-level kernels/ folder is prunedm.kernels, never a top-level
`kernels` (Hugging Face's package name), and a source tree without prunedm._C says it is not built."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_at(cwd: Path, code: str, pythonpath: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False
    )


def test_import_kernels_at_the_repo_root_does_not_run_our_folder():
    code = (
        "import kernels, sys\n"
        "path = list(getattr(kernels, '__path__', []))\n"
        "print(getattr(kernels, '__file__', None), path, hasattr(kernels, 'nm_mask'))\n"
        "print('prunedm' in sys.modules)\n"
    )
    result = run_at(REPO, code)
    assert result.returncode == 0, result.stderr
    # Looks absent (no file, empty path, none of our functions), and nothing of prunedm was imported.
    assert result.stdout.split("\n")[:2] == ["None [] False", "False"]


def test_a_real_kernels_package_wins_at_the_repo_root(tmp_path):
    fake = tmp_path / "kernels"
    fake.mkdir()
    (fake / "__init__.py").write_text("__version__ = '9.9.9'\n\ndef get_kernel(name):\n    return name\n")
    code = "import kernels\nprint(kernels.__file__, kernels.__version__, kernels.get_kernel('x'))\n"
    result = run_at(REPO, code, pythonpath=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{fake / '__init__.py'} 9.9.9 x"


def test_prunedm_kernels_still_imports_from_the_repo_root_and_elsewhere(tmp_path):
    code = (
        "from prunedm import kernels\n"
        "import prunedm.kernels.nm\n"
        "print(kernels.__name__, callable(kernels.nm_mask), sorted(kernels.__all__)[0])\n"
    )
    for cwd in (REPO, tmp_path):
        result = run_at(cwd, code)
        if result.returncode and "triton" in result.stderr.lower():
            pytest.skip("triton is not installed")
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "prunedm.kernels True compress_2to4"


def test_diffusers_unet_imports_at_the_repo_root_with_transformers_installed():
    pytest.importorskip("transformers")
    code = (
        "from diffusers import UNet2DModel, UNet2DConditionModel\n"
        "from transformers.utils import is_kernels_available\n"
        "print(UNet2DModel.__name__, UNet2DConditionModel.__name__)\n"
    )
    result = run_at(REPO, code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "UNet2DModel UNet2DConditionModel"


def test_a_source_tree_without_the_extension_says_it_is_not_built(tmp_path):
    tree = tmp_path / "src"
    shutil.copytree(REPO / "prunedm", tree / "prunedm", ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    # Without the installed package's finder, as in a fresh clone run with `python -m prunedm`.
    code = (
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
        "import prunedm\n"
        "assert prunedm.__file__.startswith(sys.argv[1]), prunedm.__file__\n"
        "print(prunedm.extension_info()['cpu']['reason'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", code, str(tree)], cwd=tree, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    reason = result.stdout.strip()
    assert reason.startswith("prunedm._C is not built") and "pip install --no-build-isolation -e ." in reason
    assert "circular" not in reason and "partially initialized" not in reason
