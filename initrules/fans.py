"""Fans of a weight as its module uses it, not as its storage layout suggests.

torch's convention (:func:`initrules.schemes.compute_fans`) reads fans from
the shape alone: dim 1 is fan_in and dim 0 fan_out, both times the receptive
field. That is right for ``nn.Linear`` and ungrouped, unstrided
``nn.Conv*d``, but not for transformers' ``Conv1D``, which stores its weight
as (in, out), nor for grouped, strided or transposed convolutions.

The true fan_in of a weight is the number of inputs each output of its
linear map sums over. The true fan_out is the number of outputs each input
feeds. With ``k`` the product of the kernel sizes, ``s`` the product of the
strides and ``g`` the groups:

=====================================  ======================  ======================
module                                 fan_in                  fan_out
=====================================  ======================  ======================
``nn.Linear``                          ``in_features``         ``out_features``
``nn.Conv*d``                          ``in / g * k``          ``out / g * k / s``
``nn.ConvTranspose*d``                 ``in / g * k / s``      ``out / g * k``
transformers ``Conv1D`` (in, out)      ``shape[0]``            ``shape[1]``
``nn.MultiheadAttention`` weights      ``shape[1]``            ``shape[0]``
``nn.RNN``/``LSTM``/``GRU`` weights    ``shape[1]``            ``shape[0]``
=====================================  ======================  ======================

A fan divided by the stride is an average over positions, rounded and at
least 1. For attention and recurrent weights the shape is that of the block
being initialized: a whole stacked tensor, or one gate or projection of it
when a rule splits the tensor into chunks.
"""

from __future__ import annotations

import math

from torch import nn

__all__ = ["true_fan_in", "true_fans"]


def _is_transformers_conv1d(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2 and relatives) has `nf` output features
    # and a weight of shape (in, nf). Matching by name avoids importing
    # transformers.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _per_position(count: int, stride: tuple[int, ...]) -> int:
    return max(1, round(count / math.prod(stride)))


def true_fans(
    module: nn.Module, local_name: str, shape: tuple[int, ...]
) -> tuple[int, int] | None:
    """Return ``(fan_in, fan_out)`` of a weight as its module uses it.

    Returns ``None`` for tensors that are not the weight of a known linear
    map: embeddings, norms, biases, and parameters of modules whose layout
    the shape alone does not reveal. The formulas are in this module's
    documentation.
    """
    if len(shape) < 2:
        return None
    # The shape, not the module's sizes, so that one block of a split weight
    # gets its own fans.
    if isinstance(module, nn.Linear) and local_name == "weight":
        return shape[1], shape[0]
    if isinstance(module, nn.modules.conv._ConvNd) and local_name == "weight":
        kernel = math.prod(module.kernel_size)
        groups = module.groups
        if module.transposed:
            # Stored as (in, out / groups, *kernel).
            into = max(1, shape[0] // groups) * kernel
            return _per_position(into, module.stride), shape[1] * kernel
        # Stored as (out, in / groups, *kernel).
        out = max(1, shape[0] // groups) * kernel
        return shape[1] * kernel, _per_position(out, module.stride)
    if _is_transformers_conv1d(module) and local_name == "weight":
        return shape[0], shape[1]
    if isinstance(module, nn.MultiheadAttention) and local_name.endswith("proj_weight"):
        return shape[1], shape[0]
    if isinstance(module, nn.RNNBase) and local_name.startswith("weight_"):
        return shape[1], shape[0]
    return None


def true_fan_in(
    module: nn.Module, local_name: str, shape: tuple[int, ...]
) -> int | None:
    """Return the true fan_in of a weight (see :func:`true_fans`), or ``None``."""
    fans = true_fans(module, local_name, shape)
    return None if fans is None else fans[0]
