"""`import prunedm` works without the compiled extension, and extension_info() says why."""

from __future__ import annotations

import json
import subprocess
import sys

import prunedm

_WITHOUT_EXTENSION = r"""
import importlib.abc, json, sys

class HideExtension(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "prunedm._C":
            raise ImportError("hidden for the test")
        return None

sys.meta_path.insert(0, HideExtension())
import torch
import prunedm
from prunedm import ops

info = prunedm.extension_info()
w = torch.randn(64, 64, dtype=torch.float16)
values, meta = ops.compress_2to4(w * ops.nm_mask(w))
ok = torch.equal(ops.decompress_2to4(values, meta), w * ops.nm_mask(w))
print(json.dumps({"info": info, "ok": ok}))
"""


def test_extension_info_shape():
    info = prunedm.extension_info()
    for backend in ("cpu", "cuda", "triton"):
        assert {"built", "usable", "reason"} <= set(info[backend])
        assert info[backend]["usable"] or info[backend]["reason"]


def test_import_and_ops_work_without_the_extension():
    out = subprocess.run([sys.executable, "-c", _WITHOUT_EXTENSION], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["ok"]
    assert result["info"]["cpu"] == {
        "built": False,
        "usable": False,
        "reason": result["info"]["cpu"]["reason"],
    }
    assert "hidden for the test" in result["info"]["cpu"]["reason"]
    assert "pip install --no-build-isolation" in result["info"]["cpu"]["reason"]
    assert not result["info"]["cuda"]["usable"]
