"""The mean and standard deviation each built-in scheme should give a tensor.

These are the population values the scheme's arguments imply for a shape,
with fans by torch's convention. The report shows them next to the measured
values, and the statistics check compares the two with a tolerance that
depends on the number of elements (see :mod:`initrules.checks`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

from torch import nn

from initrules.schemes import (
    LECUN_ARGS,
    TRUNCATED_NORMAL_STD,
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
    """The distribution a scheme should produce, as far as the checks need it.

    Attributes:
        mean: Population mean.
        std: Population standard deviation.
        kurtosis: Fourth standardized moment of one element, which sets how
            noisy a measured std is (3 for a normal, 1.8 for a uniform).
        support: The closed interval every value lies in, for bounded
            schemes (uniform and truncated normal draws), else ``None``.
        edge_density: Probability density at the two ends of ``support``,
            used to tell how many values may round onto a bound.
    """

    mean: float
    std: float
    kurtosis: float = 3.0
    support: tuple[float, float] | None = None
    edge_density: tuple[float, float] = (0.0, 0.0)


Shape = tuple[int, ...]


def _normal_pdf(x: float) -> float:
    return math.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _normal_cdf(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


_UNIFORM_KURTOSIS = 1.8


def _uniform_between(low: float, high: float) -> ExpectedStats:
    width = high - low
    if width == 0:
        return ExpectedStats(low, 0.0)
    density = 1 / width
    return ExpectedStats(
        (low + high) / 2,
        width / math.sqrt(12),
        _UNIFORM_KURTOSIS,
        (low, high),
        (density, density),
    )


def _uniform(shape: Shape, args: SchemeArgs) -> ExpectedStats:
    assert isinstance(args, UniformArgs)
    return _uniform_between(args.a, args.b)


def _normal(shape: Shape, args: SchemeArgs) -> ExpectedStats:
    assert isinstance(args, NormalArgs)
    return ExpectedStats(args.mean, args.std)


def _truncated(mean: float, std: float, low: float, high: float) -> ExpectedStats:
    """Moments of N(mean, std**2) truncated to [low, high]."""
    alpha = (low - mean) / std
    beta = (high - mean) / std
    mass = _normal_cdf(beta) - _normal_cdf(alpha)
    shift = (_normal_pdf(alpha) - _normal_pdf(beta)) / mass
    spread = (alpha * _normal_pdf(alpha) - beta * _normal_pdf(beta)) / mass
    variance = std**2 * (1 + spread - shift**2)
    # The kurtosis of a truncated normal is at most the normal's 3, so 3 keeps
    # the std tolerance on the safe side.
    return ExpectedStats(
        mean + std * shift,
        math.sqrt(max(variance, 0.0)),
        3.0,
        (low, high),
        (_normal_pdf(alpha) / (std * mass), _normal_pdf(beta) / (std * mass)),
    )


def _trunc_normal(shape: Shape, args: SchemeArgs) -> ExpectedStats:
    assert isinstance(args, TruncNormalArgs)
    return _truncated(args.mean, args.std, args.a, args.b)


def _constant(value: float) -> Callable[[Shape, SchemeArgs], ExpectedStats]:
    def expected(shape: Shape, args: SchemeArgs) -> ExpectedStats:
        return ExpectedStats(value, 0.0)

    return expected


def _constant_val(shape: Shape, args: SchemeArgs) -> ExpectedStats:
    assert isinstance(args, ConstantArgs)
    return ExpectedStats(args.val, 0.0)


def _centered(std: float, *, uniform: bool) -> ExpectedStats:
    """Return a zero-mean normal, or the zero-mean uniform with the same std."""
    if not uniform:
        return ExpectedStats(0.0, std)
    bound = math.sqrt(3.0) * std
    return _uniform_between(-bound, bound)


def _xavier(uniform: bool) -> Callable[[Shape, SchemeArgs], ExpectedStats]:
    def expected(shape: Shape, args: SchemeArgs) -> ExpectedStats:
        assert isinstance(args, GainArgs)
        fan_in, fan_out = compute_fans(shape)
        std = abs(args.gain) * math.sqrt(2.0 / (fan_in + fan_out))
        return _centered(std, uniform=uniform)

    return expected


def _kaiming(uniform: bool) -> Callable[[Shape, SchemeArgs], ExpectedStats]:
    def expected(shape: Shape, args: SchemeArgs) -> ExpectedStats:
        assert isinstance(args, KaimingArgs)
        fan_in, fan_out = compute_fans(shape)
        fan = fan_in if args.mode == "fan_in" else fan_out
        gain = nn.init.calculate_gain(args.nonlinearity, args.a)
        return _centered(abs(gain) / math.sqrt(fan), uniform=uniform)

    return expected


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
    if kept == 0 or args.std == 0:
        return ExpectedStats(0.0, 0.0)
    # A mixture of zeros and N(0, std**2) with weight `kept` has kurtosis 3 / kept.
    return ExpectedStats(0.0, args.std * math.sqrt(kept), 3.0 / kept)


def _variance_scaling(shape: Shape, args: SchemeArgs) -> ExpectedStats:
    assert isinstance(args, VarianceScalingArgs)
    fan_in, fan_out = compute_fans(shape)
    fans = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}
    std = math.sqrt(args.scale / max(1.0, fans[args.mode]))
    if args.distribution == "truncated_normal":
        # The fill widens the normal by 1 / TRUNCATED_NORMAL_STD and cuts it at
        # two of its standard deviations, which brings the std back to `std`.
        wide = std / TRUNCATED_NORMAL_STD
        return _truncated(0.0, wide, -2 * wide, 2 * wide)
    return _centered(std, uniform=args.distribution == "uniform")


def _lecun_normal(shape: Shape, args: SchemeArgs) -> ExpectedStats:
    return _variance_scaling(shape, LECUN_ARGS)


_EXPECTED: dict[str, Callable[[Shape, SchemeArgs], ExpectedStats]] = {
    "uniform": _uniform,
    "normal": _normal,
    "trunc_normal": _trunc_normal,
    "constant": _constant_val,
    "ones": _constant(1.0),
    "zeros": _constant(0.0),
    "xavier_uniform": _xavier(uniform=True),
    "xavier_normal": _xavier(uniform=False),
    "kaiming_uniform": _kaiming(uniform=True),
    "kaiming_normal": _kaiming(uniform=False),
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
