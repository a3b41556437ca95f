"""The mean and standard deviation each built-in scheme should give a tensor.

These are the population values the scheme's arguments imply for a shape,
with the fans the scheme uses (see :func:`initrules.schemes.fans_of`). A
scheme with an elementwise ``draw``, custom ones included, gets the
statistics of that distribution. The report shows them next to the measured
values, and the statistics check compares the two with a tolerance that
depends on the number of elements (see :mod:`initrules.checks`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

from initrules.schemes import (
    ConstantArgs,
    GainArgs,
    SchemeArgs,
    SparseArgs,
    get_scheme,
)
from initrules.stream import Draw

__all__ = ["ExpectedStats", "expected_of_draw", "expected_stats"]


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


def _constant(value: float) -> Callable[[Shape, SchemeArgs], ExpectedStats]:
    def expected(shape: Shape, args: SchemeArgs) -> ExpectedStats:
        return ExpectedStats(value, 0.0)

    return expected


def _constant_val(shape: Shape, args: SchemeArgs) -> ExpectedStats:
    assert isinstance(args, ConstantArgs)
    return ExpectedStats(args.val, 0.0)


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


_EXPECTED: dict[str, Callable[[Shape, SchemeArgs], ExpectedStats]] = {
    "constant": _constant_val,
    "ones": _constant(1.0),
    "zeros": _constant(0.0),
    "orthogonal": _orthogonal,
    "sparse": _sparse,
}


def expected_of_draw(draw: Draw) -> ExpectedStats:
    """Return the statistics of one elementwise draw."""
    if draw.kind == "uniform":
        return _uniform_between(draw.first, draw.second)
    if draw.kind == "normal":
        return ExpectedStats(draw.first, abs(draw.second))
    return _truncated(draw.first, draw.second, draw.low, draw.high)


def expected_stats(scheme: str, shape: Shape, args: SchemeArgs) -> ExpectedStats | None:
    """Return what ``scheme`` should give a tensor of ``shape``, if known.

    ``None`` for schemes without fixed statistics (``keep``, ``default``,
    ``eye``, ``dirac``, custom schemes without a ``draw``) and for
    zero-element shapes.
    """
    if math.prod(shape) == 0:
        return None
    compute = _EXPECTED.get(scheme)
    if compute is not None:
        return compute(shape, args)
    draw = get_scheme(scheme).draw
    return None if draw is None else expected_of_draw(draw(shape, args))
