"""A plain `pip install prunedm` (torch, numpy, safetensors, pyyaml, tqdm only): everything that needs no
optional package imports and runs; a feature that needs one says which extra brings it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from prunedm.pruning.importance import optional_import

ROOT = Path(__file__).resolve().parents[1]

# Installed in the child before anything else: these packages look uninstalled to it.
BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys
    BLOCKED = {"diffusers", "torch_pruning", "cleanfid", "sklearn", "matplotlib"}

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    sys.meta_path.insert(0, Blocker())
    """
)

CHECKS = textwrap.dedent(
    """
    import json
    import torch
    import prunedm
    from prunedm import ops

    result = {"info": sorted(prunedm.extension_info())}
    weight = torch.tensor([[1.0, -4.0, 2.0, 0.5, 3.0, -1.0, 0.25, 5.0] * 4] * 32)  # compress wants 32 x 32 tiles
    mask = ops.nm_mask(weight)
    result["mask"] = mask[0, :8].int().tolist()
    pruned = (weight * mask).half()
    values, meta = ops.compress_2to4(pruned)
    result["roundtrip"] = bool(torch.equal(ops.decompress_2to4(values, meta), pruned))

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
    x = torch.randn(8, 64)
    masked = [layer.weight.detach() * ops.nm_mask(layer.weight.detach()) for layer in (model[0], model[2])]
    expected = torch.relu(x @ masked[0].T + model[0].bias) @ masked[1].T + model[2].bias
    report = prunedm.sparsify(model, backend="torch")
    with torch.no_grad():
        actual = model(x)
    result["converted"] = len(report.converted)
    result["sparse_types"] = [type(m).__name__ for m in model]
    result["max_error"] = float((actual - expected).abs().max())

    try:
        prunedm.prune_channels(torch.nn.Sequential(torch.nn.Linear(8, 8)), importance="magnitude")
    except ImportError as exc:
        result["prune_error"] = str(exc)
    result["loaded"] = sorted(
        m for m in ("diffusers", "torch_pruning", "cleanfid", "sklearn", "matplotlib") if m in sys.modules)
    print(json.dumps(result))
    """
)


def _run(code: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout
    )


def test_import_ops_and_sparse_layers_without_optional_packages():
    proc = _run(CHECKS)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"cpu", "cuda", "triton"} <= set(result["info"])
    assert result["mask"] == [0, 1, 1, 0, 1, 0, 0, 1]  # the two largest magnitudes of each group of 4
    assert result["roundtrip"] is True
    assert result["converted"] == 2
    assert result["sparse_types"] == ["SparseLinear", "ReLU", "SparseLinear"]
    assert result["max_error"] < 1e-5
    assert result["prune_error"] == "prune_channels needs torch-pruning: pip install 'prunedm[models]'"
    assert result["loaded"] == []


def test_cli_info_runs_without_optional_packages():
    proc = _run("import runpy; sys.argv = ['prunedm', 'info']; runpy.run_module('prunedm', run_name='__main__')")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "prunedm" in proc.stdout and '"cpu"' in proc.stdout


def test_cli_prune_names_the_extra_in_one_line(tmp_path):
    out = tmp_path / "out"
    code = (
        "from prunedm.cli import main\n"
        f"sys.exit(main(['prune', 'model=asset:digits-ddpm', 'channels.importance=magnitude', '--out', {str(out)!r}]))"
    )
    proc = _run(code)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "pip install 'prunedm[models]'" in lines[0]
    assert "diffusers" in lines[0] or "torch-pruning" in lines[0]
    assert not out.exists()


def _pretend_missing(monkeypatch, *modules: str) -> None:
    """importlib.import_module reports `modules` (and their submodules) as not installed."""
    import importlib

    real = importlib.import_module

    def fake(name, *args, **kwargs):
        if name.split(".")[0] in modules:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", fake)


def test_optional_import_names_the_package_and_extra(monkeypatch):
    assert optional_import("json", "anything") is json
    _pretend_missing(monkeypatch, "cleanfid", "torch_pruning")
    with pytest.raises(ImportError, match=r"^compute_fid needs clean-fid: pip install 'prunedm\[models\]'$"):
        optional_import("cleanfid", "compute_fid")
    with pytest.raises(ImportError, match=r"^prune_channels needs torch-pruning: pip install 'prunedm\[models\]'$"):
        optional_import("torch_pruning", "prune_channels")


def test_optional_import_shows_a_broken_dependency_as_is(monkeypatch):
    import importlib

    def broken(name, *args, **kwargs):
        raise ModuleNotFoundError("No module named 'some_dep_of_diffusers'", name="some_dep_of_diffusers")

    monkeypatch.setattr(importlib, "import_module", broken)
    with pytest.raises(ModuleNotFoundError, match="some_dep_of_diffusers"):
        optional_import("diffusers", "sample")


def _setup_module():
    """setup.py's functions, without running setup() (it runs only as __main__)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("prunedm_setup_py", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakeCuda:
    """torch.cuda as setup.py sees it: GPUs of the given compute capabilities."""

    def __init__(self, *capabilities):
        self.capabilities = capabilities

    def is_available(self):
        return bool(self.capabilities)

    def device_count(self):
        return len(self.capabilities)

    def get_device_capability(self, index):
        return self.capabilities[index]


NVCC_13 = {"7.5", "8.0", "8.6", "8.7", "8.9", "9.0", "10.0", "11.0", "12.0"}


@pytest.mark.parametrize(
    "capabilities, supported, archs, source",
    [
        ([(8, 6)], NVCC_13, ["8.6+PTX"], "the visible GPU"),
        ([(9, 0)], NVCC_13, ["9.0+PTX"], "the visible GPU"),
        ([(9, 0), (8, 0), (9, 0)], NVCC_13, ["8.0", "9.0+PTX"], "the visible GPUs"),
        ([], NVCC_13, ["8.0+PTX", "9.0a"], "no GPU visible: the CI set"),
        ([(12, 1)], NVCC_13, ["8.0+PTX", "9.0a"], "no GPU visible: the CI set"),  # newer than this nvcc: PTX JIT
        ([], {"8.0", "8.6"}, ["8.0+PTX"], "no GPU visible: the CI set"),
        ([(8, 0)], set(), ["8.0+PTX"], "the visible GPU"),  # nvcc's list unknown: trust the GPU
    ],
)
def test_cuda_archs_default_to_the_visible_gpu_else_the_ci_set(capabilities, supported, archs, source):
    setup_py = _setup_module()
    assert setup_py.default_cuda_archs(supported, FakeCuda(*capabilities)) == (archs, source)


def test_cuda_archs_survive_a_broken_driver_and_describe_themselves():
    setup_py = _setup_module()

    class BrokenCuda(FakeCuda):
        def get_device_capability(self, index):
            raise RuntimeError("CUDA driver initialization failed")

    assert setup_py.default_cuda_archs(NVCC_13, BrokenCuda((8, 0)))[0] == ["8.0+PTX", "9.0a"]
    assert setup_py.describe_archs(["8.0+PTX", "9.0a"]) == "sm_80, sm_90a (+compute_80 PTX)"
    assert setup_py.describe_archs(["8.6+PTX"]) == "sm_86 (+compute_86 PTX)"
    # Calibration: four archs of the four kernel sources (+4 C++ files) took about 20 minutes on 2 cores.
    assert setup_py.estimated_build_minutes(4, 4, ["8.0", "8.6", "8.9", "9.0a"], jobs=2) == 18
    assert setup_py.estimated_build_minutes(4, 4, ["8.6+PTX"], jobs=2) == 7
    assert setup_py.estimated_build_minutes(0, 4, [], jobs=4) == 1


def test_readme_install_section_names_every_extra_and_build_knob():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    readme = (ROOT / "README.md").read_text()
    install = readme[readme.index("## Install") :]
    install = install[: install.index("\n## ", 1)]
    assert {"models", "cupy", "test"} <= set(extras)
    for extra, packages in extras.items():
        assert f"'prunedm[{extra}]'" in install, extra
        for package in packages:  # "torch-pruning>=1.4" -> torch-pruning; "cupy-cuda12x" is named as is
            assert package.split(">")[0].split("=")[0] in install, (extra, package)
    for knob in ("TORCH_CUDA_ARCH_LIST", "PRUNEDM_SKIP_CUDA_BUILD", "MAX_JOBS"):
        assert knob in install
