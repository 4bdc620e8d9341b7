"""The built-in architectures are the real models' shapes."""

from __future__ import annotations

import pytest
import torch

from prunedm.architectures import ARCHITECTURES, build


def test_ddpm_cifar10_has_the_published_size():
    model = build("ddpm-cifar10-32", seed=0)
    assert sum(p.numel() for p in model.parameters()) == 35_746_307


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_every_architecture_builds_on_meta(name):
    model = build(name, device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    with torch.device("meta"):
        assert next(build(name).parameters()).device.type == "meta"


def test_unknown_architecture():
    with pytest.raises(ValueError, match="unknown architecture 'unet9'"):
        build("unet9")
