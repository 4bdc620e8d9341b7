"""What prunedm's Triton kernels share: op registration that works both compiled and interpreted,
and the integer views through which the kernels read floating-point values bit-exactly."""

from __future__ import annotations

import contextlib

import torch

try:
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # a Triton without the interpreter: every kernel is compiled
    InterpretedFunction = ()

# Integer type of each element size, to reinterpret a tensor's storage without changing a bit.
_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

# For the floats whose sign is the top bit: (mask clearing the sign, bits of +inf). Working on
# these bits instead of float values keeps denormals, -0.0 and NaN exact on every device.
_IEEE_FLOATS = {
    torch.float16: (0x7FFF, 0x7C00),
    torch.bfloat16: (0x7FFF, 0x7F80),
    torch.float32: (0x7FFF_FFFF, 0x7F80_0000),
    torch.float64: (0x7FFF_FFFF_FFFF_FFFF, 0x7FF0_0000_0000_0000),
}


def register(name: str, kernel, fake):
    """Decorator registering a launcher as torch.ops.<name> with `fake` as its FakeTensor impl.

    Compiled kernels make a torch.library.triton_op, which torch.compile traces into. Under
    TRITON_INTERPRET=1 the kernel runs eagerly on real data and cannot be captured in a graph, so
    there the op is an opaque torch.library.custom_op (same schema, same results)."""

    def decorate(launcher):
        if isinstance(kernel, InterpretedFunction):
            op = torch.library.custom_op(name, mutates_args=())(launcher)
        else:
            op = torch.library.triton_op(name, mutates_args=())(launcher)
        # An explicit fake spares FakeTensor tracing from running the launcher and its kernel.
        op.register_fake(fake)
        return op

    return decorate


def wrap_triton(kernel):
    """torch.library.wrap_triton(kernel), passing an interpreted kernel through as it is.

    Interpreted kernels run eagerly inside an opaque op (see register), and older torch releases
    refuse them. Called by this name so that triton_op finds the kernels an op launches."""
    if isinstance(kernel, InterpretedFunction):
        return kernel
    return torch.library.wrap_triton(kernel)


def on_device_of(t: torch.Tensor):
    """Context making t's GPU the current one: Triton launches on the current device, not the tensor's."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def magnitude_bits(t: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(contiguous integer view of t, mask keeping its magnitude bits, bits of +inf) for a float t.

    Floats other than the four IEEE ones (the float8 types) are widened to float32 first: exact,
    and it maps their own NaN and zero encodings to float32's."""
    if t.dtype not in _IEEE_FLOATS:
        t = t.float()
    magnitude_mask, inf_bits = _IEEE_FLOATS[t.dtype]
    return t.contiguous().view(_INT_OF_SIZE[t.element_size()]), magnitude_mask, inf_bits


def nonzero_bits(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(contiguous integer view of t, mask of the bits that make an element non-zero) for any real t.

    An element is non-zero exactly when (bits & mask) != 0: floats drop the sign bit (-0.0 is
    zero, NaN is not), integers and bools keep every bit."""
    if t.is_floating_point():
        bits, magnitude_mask, _ = magnitude_bits(t)
        return bits, magnitude_mask
    return t.contiguous().view(_INT_OF_SIZE[t.element_size()]), -1
