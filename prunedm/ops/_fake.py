"""Fake (meta) implementations of the compiled ops, so torch.compile and FakeTensor can trace them.

Imported by prunedm.ops._backends once prunedm._C has loaded with every op it needs (prunedm._ext)."""

from __future__ import annotations

import torch


@torch.library.register_fake("prunedm::nm_mask")
def _nm_mask_fake(weight, n, m):
    return torch.empty_like(weight, dtype=torch.bool, memory_format=torch.contiguous_format)


@torch.library.register_fake("prunedm::nm_violations")
def _nm_violations_fake(t, n, m):
    return t.new_empty((), dtype=torch.int64)


@torch.library.register_fake("prunedm::compress_2to4")
def _compress_2to4_fake(dense):
    rows, cols = dense.shape
    return dense.new_empty((rows, cols // 2)), dense.new_empty((rows, cols // 16), dtype=torch.int16)


@torch.library.register_fake("prunedm::decompress_2to4")
def _decompress_2to4_fake(values, meta):
    rows, half_cols = values.shape
    return values.new_empty((rows, 2 * half_cols))


# Gumbel N:M sampling: fake implementations, and the autograd formulas of the forward ops (their
# backward ops recompute noise and relaxation from the seed, so only the logits are saved).


def _register_gumbel() -> None:
    @torch.library.register_fake("prunedm::gumbel_nm_sample")
    def _gumbel_nm_sample_fake(logits, n, m, tau, hard, seed, offset=0):
        return torch.empty_like(logits, memory_format=torch.contiguous_format)

    @torch.library.register_fake("prunedm::gumbel_nm_sample_backward")
    def _gumbel_nm_sample_backward_fake(grad, logits, n, m, tau, seed, offset=0):
        return torch.empty_like(logits, memory_format=torch.contiguous_format)

    @torch.library.register_fake("prunedm::gumbel_pattern_sample")
    def _gumbel_pattern_sample_fake(pattern_logits, n, m, tau, hard, seed, offset=0):
        *batch, groups, _ = pattern_logits.shape
        return pattern_logits.new_empty((*batch, groups * m))

    @torch.library.register_fake("prunedm::gumbel_pattern_sample_backward")
    def _gumbel_pattern_sample_backward_fake(grad, pattern_logits, n, m, tau, seed, offset=0):
        return torch.empty_like(pattern_logits, memory_format=torch.contiguous_format)

    no_grads = (None,) * 6  # n, m, tau, hard, seed, offset

    def save_inputs(ctx, inputs, output):
        logits, n, m, tau, _hard, seed, offset = inputs
        ctx.save_for_backward(logits)
        ctx.args = (n, m, tau, seed, offset)

    def nm_backward(ctx, grad):
        (logits,) = ctx.saved_tensors
        return torch.ops.prunedm.gumbel_nm_sample_backward(grad, logits, *ctx.args), *no_grads

    def pattern_backward(ctx, grad):
        (logits,) = ctx.saved_tensors
        return torch.ops.prunedm.gumbel_pattern_sample_backward(grad, logits, *ctx.args), *no_grads

    torch.library.register_autograd("prunedm::gumbel_nm_sample", nm_backward, setup_context=save_inputs)
    torch.library.register_autograd("prunedm::gumbel_pattern_sample", pattern_backward, setup_context=save_inputs)


_register_gumbel()


# 2:4 sparse linear / conv: output shapes (and the conv's memory format, as csrc/common/checks.h's
# conv_output_channels_last decides it).


def _register_sparse_mm() -> None:
    @torch.library.register_fake("prunedm::sparse_linear_2to4")
    def _sparse_linear_2to4_fake(input, values, meta, bias, activation, residual):
        return input.new_empty((*input.shape[:-1], values.shape[0]))

    @torch.library.register_fake("prunedm::sparse_conv2d_2to4")
    def _sparse_conv2d_2to4_fake(input, values, meta, weight_shape, bias, stride, padding, dilation, activation,
                                 residual):  # fmt: skip
        from prunedm.ops._checks import conv_out_size

        out_hw = [conv_out_size(input.shape[2 + i], weight_shape[2 + i], stride[i], padding[i], dilation[i])
                  for i in range(2)]  # fmt: skip
        channels_last = input.is_contiguous(memory_format=torch.channels_last) and not input.is_contiguous()
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        return input.new_empty((input.shape[0], values.shape[0], *out_hw)).contiguous(memory_format=fmt)


_register_sparse_mm()
