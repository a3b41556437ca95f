"""The mean and standard deviation each built-in scheme should give a tensor.

These are the population values the scheme's arguments imply for a shape,
with fans by torch's convention. The report shows them next to the measured
values so that a reader can compare the two.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

from torch import nn

from initrules.schemes import (
    ConstantArgs,
    GainArgs,
    KaimingArgs,
    NormalArgs,
    SchemeArgs,
    SparseArgs,
    TruncNormalArgs,
    UniformArgs,
    VarianceScalingArgs,
    compute_fans,
)

__all__ = ["ExpectedStats", "expected_stats"]


class ExpectedStats(NamedTuple):
    """Mean and standard deviation a scheme should produce."""

    mean: float
    std: float


Shape = tuple[int, ...]


def _normal_pdf(x: float) -> float:
    return math.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _normal_cdf(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def _uniform(shape: Shape, args: SchemeArgs) -> ExpectedStats:
    assert isinstance(args, UniformArgs)
    return ExpectedStats((args.a + args.b) / 2, (args.b - args.a) / math.sqrt(12))


def _normal(shape: Shape, args: SchemeArgs) -> ExpectedStats:
    assert isinstance(args, NormalArgs)
    return ExpectedStats(args.mean, args.std)


def _trunc_normal(shape: Shape, args: SchemeArgs) -> ExpectedStats:
    """Moments of N(mean, std**2) truncated to [a, b]."""
    assert isinstance(args, TruncNormalArgs)
    alpha = (args.a - args.mean) / args.std
    beta = (args.b - args.mean) / args.std
    mass = _normal_cdf(beta) - _normal_cdf(alpha)
    shift = (_normal_pdf(alpha) - _normal_pdf(beta)) / mass
    spread = (alpha * _normal_pdf(alpha) - beta * _normal_pdf(beta)) / mass
    variance = args.std**2 * (1 + spread - shift**2)
    return ExpectedStats(args.mean + args.std * shift, math.sqrt(max(variance, 0.0)))


def _constant(value: float) -> Callable[[Shape, SchemeArgs], ExpectedStats]:
    def expected(shape: Shape, args: SchemeArgs) -> ExpectedStats:
        return ExpectedStats(value, 0.0)

    return expected


def _constant_val(shape: Shape, args: SchemeArgs) -> ExpectedStats:
    assert isinstance(args, ConstantArgs)
    return ExpectedStats(args.val, 0.0)


def _xavier(shape: Shape, args: SchemeArgs) -> ExpectedStats:
    assert isinstance(args, GainArgs)
    fan_in, fan_out = compute_fans(shape)
    return ExpectedStats(0.0, abs(args.gain) * math.sqrt(2.0 / (fan_in + fan_out)))


def _kaiming(shape: Shape, args: SchemeArgs) -> ExpectedStats:
    assert isinstance(args, KaimingArgs)
    fan_in, fan_out = compute_fans(shape)
    fan = fan_in if args.mode == "fan_in" else fan_out
    gain = nn.init.calculate_gain(args.nonlinearity, args.a)
    return ExpectedStats(0.0, abs(gain) / math.sqrt(fan))


def _orthogonal(shape: Shape, args: SchemeArgs) -> ExpectedStats:
    # Rows or columns (whichever are fewer) are orthonormal, so the squared
    # values sum to min(rows, columns) over rows * columns elements.
    assert isinstance(args, GainArgs)
    rows = shape[0]
    columns = math.prod(shape[1:])
    return ExpectedStats(
        0.0, abs(args.gain) * math.sqrt(min(rows, columns) / (rows * columns))
    )


def _sparse(shape: Shape, args: SchemeArgs) -> ExpectedStats:
    # torch zeroes ceil(sparsity * rows) entries of every column.
    assert isinstance(args, SparseArgs)
    rows = shape[0]
    kept = 1 - math.ceil(args.sparsity * rows) / rows
    return ExpectedStats(0.0, args.std * math.sqrt(kept))


def _variance_scaling(shape: Shape, args: SchemeArgs) -> ExpectedStats:
    assert isinstance(args, VarianceScalingArgs)
    fan_in, fan_out = compute_fans(shape)
    fans = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}
    return ExpectedStats(0.0, math.sqrt(args.scale / max(1.0, fans[args.mode])))


def _lecun_normal(shape: Shape, args: SchemeArgs) -> ExpectedStats:
    fan_in, _ = compute_fans(shape)
    return ExpectedStats(0.0, math.sqrt(1.0 / max(1, fan_in)))


_EXPECTED: dict[str, Callable[[Shape, SchemeArgs], ExpectedStats]] = {
    "uniform": _uniform,
    "normal": _normal,
    "trunc_normal": _trunc_normal,
    "constant": _constant_val,
    "ones": _constant(1.0),
    "zeros": _constant(0.0),
    "xavier_uniform": _xavier,
    "xavier_normal": _xavier,
    "kaiming_uniform": _kaiming,
    "kaiming_normal": _kaiming,
    "orthogonal": _orthogonal,
    "sparse": _sparse,
    "variance_scaling": _variance_scaling,
    "lecun_normal": _lecun_normal,
}


def expected_stats(scheme: str, shape: Shape, args: SchemeArgs) -> ExpectedStats | None:
    """Return what ``scheme`` should give a tensor of ``shape``, if known.

    ``None`` for schemes without fixed statistics (``keep``, ``default``,
    ``eye``, ``dirac``, custom schemes) and for zero-element shapes.
    """
    compute = _EXPECTED.get(scheme)
    if compute is None or math.prod(shape) == 0:
        return None
    return compute(shape, args)
