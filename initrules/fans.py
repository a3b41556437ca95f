"""Fans of a weight as its module uses it, not as its storage layout suggests.

torch's convention (:func:`initrules.schemes.compute_fans`) reads fans from
the shape alone: dim 1 is fan_in and dim 0 fan_out, both times the receptive
field. That is right for ``nn.Linear`` and ``nn.Conv*d`` but not for
transformers' ``Conv1D``, which stores its weight as (in, out), nor for
transposed convolutions. The scale check needs the true fan_in: the number
of inputs each output of the linear map sums over.
"""

from __future__ import annotations

import math

from torch import nn

__all__ = ["true_fan_in"]


def _is_transformers_conv1d(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2 and relatives) has `nf` output features
    # and a weight of shape (in, nf). Matching by name avoids importing
    # transformers.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def true_fan_in(
    module: nn.Module, local_name: str, shape: tuple[int, ...]
) -> int | None:
    """Return the number of inputs each output of a weight's linear map sums over.

    Returns ``None`` for tensors that are not the weight of a known linear
    map: embeddings, norms, and parameters of modules this function does not
    know, whose layout the shape alone does not reveal.

    Known layouts:

    * ``nn.Linear`` (and subclasses): ``in_features``.
    * ``nn.Conv1d/2d/3d``: ``in_channels / groups`` times the kernel size.
    * ``nn.ConvTranspose1d/2d/3d``: ``in_channels / groups`` times the kernel
      size divided by the stride, since each output position receives that
      many kernel taps on average (at least 1).
    * transformers' ``Conv1D``: dim 0 of the (in, out) weight.
    * ``nn.MultiheadAttention``'s ``in_proj_weight`` and ``q/k/v_proj_weight``,
      and the ``weight_ih_l*``/``weight_hh_l*`` of ``nn.RNN``, ``nn.LSTM`` and
      ``nn.GRU``: dim 1, the input size of each stacked block.
    """
    if len(shape) < 2:
        return None
    if isinstance(module, nn.Linear) and local_name == "weight":
        return module.in_features
    if isinstance(module, nn.modules.conv._ConvNd) and local_name == "weight":
        kernel = math.prod(module.kernel_size)
        per_group = module.in_channels // module.groups
        if module.transposed:
            return max(1, round(per_group * kernel / math.prod(module.stride)))
        return per_group * kernel
    if _is_transformers_conv1d(module) and local_name == "weight":
        return shape[0]
    if isinstance(module, nn.MultiheadAttention) and local_name.endswith("proj_weight"):
        return shape[1]
    if isinstance(module, nn.RNNBase) and local_name.startswith("weight_"):
        return shape[1]
    return None
