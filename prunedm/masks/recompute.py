"""The masked weights W * M of a mask-learning forward, recomputed when the backward needs them instead of kept
from the forward (autograd keeps each layer's for its input gradient: 4 bytes per weight in fp32, 2 in bf16)."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable

import torch

MaskSource = torch.Tensor | Callable[[], torch.Tensor]


class _Recipe:
    """How to remake a saved view of W * M: the weight, the mask (a tensor, or the callable that drew it: the same
    draw again, seeded by the step), and the view's size, stride and offset."""

    __slots__ = ("weight", "source", "view")

    def __init__(self, weight: torch.Tensor, source: MaskSource, view: tuple) -> None:
        self.weight, self.source, self.view = weight, source, view

    def remake(self) -> torch.Tensor:
        with torch.no_grad():
            mask = self.source() if callable(self.source) else self.source
            return (self.weight * mask.to(self.weight.dtype)).as_strided(*self.view)


class MaskedWeightRecompute:
    """While active(), autograd saves each recorded product W * M (or a view of it, as linear's W.t()) as a recipe
    and remakes it, bitwise the same, when the backward unpacks it. MaskedWeight records its outputs here."""

    def __init__(self) -> None:
        self._made: dict[int, tuple[weakref.ref, torch.Tensor, MaskSource]] = {}
        self.on = False

    def record(self, product: torch.Tensor, weight: torch.Tensor, source: MaskSource) -> None:
        if self.on:
            self._made[product.untyped_storage().data_ptr()] = (weakref.ref(product), weight, source)

    def _pack(self, tensor: torch.Tensor):
        if type(tensor) is not torch.Tensor or not self._made:
            return tensor
        entry = self._made.get(tensor.untyped_storage().data_ptr())
        if entry is None or entry[0]() is None:  # a dead product's storage may hold another tensor now
            return tensor
        return _Recipe(entry[1], entry[2], (tensor.size(), tensor.stride(), tensor.storage_offset()))

    @staticmethod
    def _unpack(packed):
        return packed.remake() if isinstance(packed, _Recipe) else packed

    @contextlib.contextmanager
    def active(self):
        """Record and repack the forward run inside (the backward may run after it)."""
        self.on = True
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                yield
        finally:
            self.on = False
            self._made.clear()
