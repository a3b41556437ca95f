"""Checks of initialized tensors: finite values, statistics, scale, bounds, ties.

Checks run in two places. Before anything is written, :func:`plan_failures`
judges each rule's arguments alone: a std far from sqrt(2 / fan_in) on a
linear map, or arguments that already break the rule's ``expect`` bounds.
A policy that is wrong on its face therefore writes nothing. After writing
(or on a model initialized elsewhere), :func:`tensor_failures` and
:func:`tie_failures` judge the values themselves.

The statistics check compares the measured mean and std with the values the
scheme implies. For n independent draws with std ``s`` and kurtosis ``k``,
the standard error of the mean is ``s / sqrt(n)`` and that of the std is
about ``s * sqrt((k - 1) / (4 n))``. The check accepts ``tolerance`` of those
(6 by default, so a correct init fails about once in 5e8 comparisons), plus
a few units of the dtype's precision for rounding.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from initrules.expected import ExpectedStats, expected_stats
from initrules.fans import true_fan_in
from initrules.planner import Plan, PlannedTensor, walk_modules
from initrules.report import CheckFailure
from initrules.schema import Checks, Rule
from initrules.schemes import SparseArgs

__all__ = [
    "CANCELLATION_RATIO",
    "MEASURED_ALONE",
    "ChunkSums",
    "Expectations",
    "Measured",
    "Switches",
    "expected_for",
    "measure",
    "measure_many",
    "plan_failures",
    "reads_values",
    "sum_of_squares",
    "switches_for",
    "tensor_failures",
    "tie_failures",
]

# Units of the dtype's machine epsilon added to every statistics tolerance,
# for the rounding of each value to the dtype and of the reductions.
_ROUNDING_UNITS = 4.0

# A few values on a bound are always accepted, whatever rounding explains.
_BOUND_SLACK = 2


@dataclass(frozen=True)
class Measured:
    """Statistics of a tensor's values, taken in float32 or wider."""

    mean: float
    std: float
    min: float
    max: float

    @property
    def finite(self) -> bool:
        """True if no statistic is NaN or Inf, so no value is either."""
        isfinite = math.isfinite
        return (
            isfinite(self.mean)
            and isfinite(self.std)
            and isfinite(self.min)
            and isfinite(self.max)
        )


def measure(tensor: torch.Tensor) -> Measured | None:
    """Return the mean, std (with Bessel's correction), min and max of a tensor.

    ``None`` for tensors without a real order: empty, boolean or complex. A
    NaN anywhere makes the mean NaN and an Inf makes a bound infinite, so
    :attr:`Measured.finite` is True only if every value is finite.
    """
    if tensor.numel() == 0 or tensor.dtype == torch.bool or tensor.is_complex():
        return None
    values = tensor.detach()
    # Integer and narrow float dtypes (float16, bfloat16, float8) have no or
    # imprecise reduction kernels, so their statistics are taken in float32.
    if not values.is_floating_point() or values.dtype.itemsize < 4:
        values = values.float()
    values = values.reshape(-1)
    if values.numel() == 1:
        value = float(values[0])
        return Measured(value, 0.0, value, value)
    mean, std = _mean_std(values)
    # Two passes of amin and amax took 0.8 of the time of one aminmax pass
    # on 2**20 float32 values (one thread of a 2-vCPU AVX512 machine).
    return Measured(mean, std, float(values.amin()), float(values.amax()))


# Block length of the sum of squares: float32 norms of blocks this long, then
# summed in float64, keep the relative error near 1e-8 (measured on 2**24
# normal values) while running at the speed of one vectorized pass.
_BLOCK = 4096

# When n * mean**2 exceeds the centered sum of squares by this factor, the
# shortcut var = (sum of squares - n * mean**2) / (n - 1) loses too many
# digits, so the values are centered first. The blocked sums keep about 8
# digits and the float64 ones about 15.
CANCELLATION_RATIO = 1000.0
_CANCELLATION_RATIO_FLOAT64 = 1e9


# Tensors up to this many elements take their statistics in float64.
_SMALL_TENSOR = 1 << 16

MEASURED_ALONE = _SMALL_TENSOR
"""Tensors above this many elements are measured one at a time, not in batches."""


def _block_norms(values: torch.Tensor) -> torch.Tensor:
    """Return the norms of a 1-D float tensor's blocks of ``_BLOCK`` values, in float64.

    Full blocks are reduced in their own dtype and the shorter tail in
    float64. The squares of the norms sum to the tensor's sum of squares.
    """
    whole = values.numel() - values.numel() % _BLOCK
    norms = [torch.linalg.vector_norm(values[:whole].view(-1, _BLOCK), dim=1).double()]
    if whole < values.numel():
        norms.append(torch.linalg.vector_norm(values[whole:].double()).reshape(1))
    return torch.cat(norms)


def _std_from_sums(
    count: int, mean: float, squares: float, ratio: float
) -> float | None:
    """Return the std from the sum of squares, or ``None`` if that loses digits.

    The shortcut var = (squares - n * mean**2) / (n - 1) is used only while
    n * mean**2 stays within ``ratio`` times the centered sum, and ``None``
    also covers a sum of squares that overflowed.
    """
    centered = squares - count * mean * mean
    if not math.isfinite(centered) or count * mean * mean > ratio * max(centered, 0.0):
        return None
    return math.sqrt(max(centered, 0.0) / (count - 1))


def sum_of_squares(values: torch.Tensor) -> float:
    """Return the sum of squares of a 1-D float tensor, in float64 precision."""
    total = float(_block_norms(values).square().sum())
    if math.isinf(total) and values.dtype != torch.float64:
        # A block's norm overflowed float32 (a block of 4096 values of 3e17
        # does), so the blocks are summed again in float64.
        total = 0.0
        for block in torch.split(values, _BLOCK * 256):
            total += float(torch.linalg.vector_norm(block.double())) ** 2
    return total


def _mean_std(values: torch.Tensor) -> tuple[float, float]:
    """Return the mean and std of a 1-D float tensor.

    ``torch.std_mean`` runs Welford's update per element, which costs about as
    much as drawing the values; a sum and a sum of squares are vectorized
    and several times faster.
    """
    count = values.numel()
    if count <= _SMALL_TENSOR:
        # One float64 copy and two reductions beat the blocked path's several
        # calls here, and float64 keeps the shortcut below exact enough.
        wide = values.double()
        mean = float(wide.sum()) / count
        if not math.isfinite(mean):
            return mean, math.nan
        # vector_norm, not dot: float64 dot spreads small vectors over
        # threads, which cost 20 times the work on a busy 2-CPU machine.
        squares = float(torch.linalg.vector_norm(wide)) ** 2
        std = _std_from_sums(count, mean, squares, _CANCELLATION_RATIO_FLOAT64)
        if std is None:
            centered = float((wide - mean).square().sum())
            std = math.sqrt(centered / (count - 1))
        return mean, std
    mean = float(values.sum()) / count
    if not math.isfinite(mean):
        return mean, math.nan
    std = _std_from_sums(count, mean, sum_of_squares(values), CANCELLATION_RATIO)
    if std is None:
        std = math.sqrt(sum_of_squares(values - mean) / (count - 1))
    return mean, std


class ChunkSums:
    """Sums of a tensor's values, gathered chunk by chunk while it is drawn.

    Each chunk's sum, sum of squares, min and max are taken right after the
    chunk is written, on the thread that wrote it, while the values are in
    the cache. Reading the tensor again afterwards would cost a pass over
    memory per reduction.
    """

    def __init__(self, count: int) -> None:
        self.count = count
        # Per chunk: the float32 sum, min and max, the norms of its blocks
        # and the element count. They stay tensors until measured(), which
        # converts them all at once.
        self._parts: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}

    def add(self, index: int, values: torch.Tensor) -> None:
        """Record chunk ``index``, a 1-D float tensor (safe to call from threads)."""
        if values.dtype.itemsize < 4:
            values = values.float()
        extremes = torch.stack((values.sum(), values.amin(), values.amax()))
        # Each chunk writes its own key, and a dict store is atomic in CPython.
        self._parts[index] = (extremes, _block_norms(values), values.numel())

    def measured(self) -> Measured | None:
        """Return the whole tensor's statistics.

        ``None`` when the chunks did not cover it, or when the sums cannot
        give them precisely (measure the values then): the mean is too large
        against the spread, or the squares overflowed float32.
        """
        parts = self._parts.values()
        count = self.count
        if count < 2 or sum(part[2] for part in parts) != count:
            return None
        sums, lows, highs = torch.stack([part[0] for part in parts]).t().tolist()
        mean = math.fsum(sums) / count
        low, high = min(lows), max(highs)
        if not math.isfinite(mean):
            return Measured(mean, math.nan, low, high)
        norms = torch.cat([part[1] for part in parts])
        std = _std_from_sums(
            count, mean, float(norms.square().sum()), CANCELLATION_RATIO
        )
        return None if std is None else Measured(mean, std, low, high)


# Small tensors of one shape are measured together, stacked as the rows of a
# matrix of at most this many elements. A deep model's thousands of small
# tensors then cost a few reductions per batch instead of a few per tensor.
# Larger batches were slower on a 2-vCPU AVX512 machine, likely because their
# buffers no longer fit in the cache.
_STACK_ELEMENTS = 1 << 17


def measure_many(tensors: Sequence[torch.Tensor]) -> list[Measured | None]:
    """Return :func:`measure` of each tensor, measuring small tensors in batches.

    Floating tensors of 2 to 65,536 elements that share a shape, dtype and
    device are stacked and reduced row by row, in float32 or wider as the
    blocked sums of large tensors are. A row whose mean is too large
    against its spread for that precision is measured alone, in float64.
    """
    measured: list[Measured | None] = [None] * len(tensors)
    groups: dict[tuple[torch.Size, torch.dtype, torch.device], list[int]] = {}
    for index, tensor in enumerate(tensors):
        count = tensor.numel()
        if 1 < count <= _SMALL_TENSOR and tensor.is_floating_point():
            key = (tensor.shape, tensor.dtype, tensor.device)
            groups.setdefault(key, []).append(index)
        else:
            measured[index] = measure(tensor)
    # One buffer per dtype and device takes every batch, because many
    # short-lived buffers of this size raised the peak RSS of build by
    # megabytes on a deep model.
    buffers: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
    for (shape, dtype, device), indices in groups.items():
        step = max(1, _STACK_ELEMENTS // shape.numel())
        buffer = buffers.get((dtype, device))
        if buffer is None:
            buffer = torch.empty(_STACK_ELEMENTS, dtype=dtype, device=device)
            buffers[dtype, device] = buffer
        for start in range(0, len(indices), step):
            batch = indices[start : start + step]
            stacked = buffer[: len(batch) * shape.numel()].view(len(batch), *shape)
            with torch.no_grad():
                torch.stack([tensors[index] for index in batch], out=stacked)
            rows = stacked.view(len(batch), -1)
            for index, result in zip(batch, _measure_rows(rows), strict=True):
                measured[index] = (
                    result if result is not None else measure(tensors[index])
                )
    return measured


# A row whose n * mean**2 exceeds its centered sum of squares by this factor
# is measured alone, in float64: the float32 sums of a row keep about 7
# digits, and the shortcut var = (sum of squares - n * mean**2) / (n - 1)
# loses log10 of this factor of them.
_ROW_CANCELLATION_RATIO = 10.0


def _measure_rows(rows: torch.Tensor) -> list[Measured | None]:
    """Measure each row of a 2-D float tensor (``None`` for a row to measure alone)."""
    if rows.dtype.itemsize < 4:
        rows = rows.float()
    count = rows.shape[1]
    sums = rows.sum(dim=1).tolist()
    norms = torch.linalg.vector_norm(rows, dim=1).tolist()
    lows = rows.amin(dim=1).tolist()
    highs = rows.amax(dim=1).tolist()
    results: list[Measured | None] = []
    for total, norm, low, high in zip(sums, norms, lows, highs, strict=True):
        if low == high:
            # Every value is the same, so these statistics are exact.
            results.append(Measured(low, 0.0, low, high))
            continue
        mean = total / count
        if not math.isfinite(mean):
            results.append(Measured(mean, math.nan, low, high))
            continue
        # An infinite norm of finite values overflowed float32, and
        # _std_from_sums returns None for it too.
        std = _std_from_sums(count, mean, norm * norm, _ROW_CANCELLATION_RATIO)
        results.append(None if std is None else Measured(mean, std, low, high))
    return results


@dataclass(frozen=True)
class Switches:
    """The per-tensor checks that apply to one rule's tensors."""

    finite: bool
    statistics: bool
    scale: bool
    bounds: bool


def switches_for(checks: Checks, rule: Rule) -> Switches:
    """Combine the policy's ``checks`` section with a rule's overrides.

    A rule with ``expect`` is exempt from the scale check, since its bounds
    state the scale it means.
    """

    def pick(override: bool | None, default: bool) -> bool:
        return checks.enabled and (default if override is None else override)

    overrides = rule.checks
    return Switches(
        finite=pick(overrides.finite, checks.finite),
        statistics=pick(overrides.statistics, checks.statistics),
        scale=pick(overrides.scale, checks.scale) and rule.expect is None,
        bounds=pick(overrides.bounds, checks.bounds),
    )


def expected_for(item: PlannedTensor, zeroed_rows: int = 0) -> ExpectedStats | None:
    """Return what a planned tensor should hold after its scheme ran.

    Args:
        item: The planned tensor.
        zeroed_rows: Rows of dim 0 set to zero after the draw (an
            embedding's padding row), which shift the mean and std.
    """
    shape = item.shape
    expected = expected_stats(item.scheme.name, shape, item.args)
    if expected is None or zeroed_rows == 0:
        return expected
    zeroed = zeroed_rows / shape[0]
    kept = 1 - zeroed
    mean = kept * expected.mean
    second_moment = kept * (expected.std**2 + expected.mean**2)
    support = expected.support
    if support is not None and not support[0] <= 0 <= support[1]:
        support = None
    return ExpectedStats(
        mean,
        math.sqrt(max(second_moment - mean**2, 0.0)),
        expected.kurtosis / kept if kept > 0 else expected.kurtosis,
        support,
        expected.edge_density,
    )


def _failure(
    check: str,
    name: str,
    text: str,
    rule: PlannedTensor | None,
    *,
    measured: float | None = None,
    expected: float | None = None,
    allowed: tuple[float, float] | None = None,
) -> CheckFailure:
    # The rule's label is built only here, for a failure: building it for
    # every tensor cost more than the checks themselves on deep models.
    label = _rule_label(rule) if rule is not None else None
    where = f" ({label})" if label else ""
    return CheckFailure(
        check=check,
        tensor=name,
        message=f"{check}: {name!r}{where}: {text}",
        measured=measured,
        expected=expected,
        allowed=allowed,
        rule=label,
    )


def _rule_label(item: PlannedTensor) -> str:
    return item.match.rule.label(item.match.rule_index)


def _feeds_linear_map(item: PlannedTensor) -> int | None:
    """Return the true fan_in of a linear map's weight (or block), or ``None``.

    A tensor tied to an embedding is an embedding table first, so it is not
    judged by the fan_in of the head that shares it.
    """
    entry = item.entry
    owners = [entry.module, *entry.alias_modules]
    if any(isinstance(owner, (nn.Embedding, nn.EmbeddingBag)) for owner in owners):
        return None
    return true_fan_in(entry.module, entry.info.local_name, item.shape)


def _scale_failures(
    item: PlannedTensor,
    checks: Checks,
    mean: float,
    std: float,
    source: str,
) -> list[CheckFailure]:
    """Judge a std and mean against sqrt(2 / fan_in) of the owning module.

    ``source`` names where the numbers come from ("the arguments imply" or
    "measured"), for the message.
    """
    fan_in = _feeds_linear_map(item)
    if fan_in is None:
        return []
    name = item.label
    rule = item
    reference = math.sqrt(2.0 / fan_in)
    low, high = checks.scale_range
    ratio = std / reference
    failures = []
    hint = (
        "if this is intended, state it in the rule with 'expect: {mean: [low, high], "
        "std: [low, high]}', or turn the check off with 'checks: {scale: false}'"
    )
    if not low <= ratio <= high:
        side = "above" if ratio > high else "below"
        failures.append(
            _failure(
                "scale",
                name,
                f"std {std:.4g} ({source}) is {ratio:.3g}x sqrt(2/fan_in) = "
                f"{reference:.4g} for fan_in {fan_in} of "
                f"{type(item.entry.module).__name__}, {side} the accepted "
                f"{low:g}x to {high:g}x; {hint}",
                rule,
                measured=std,
                expected=reference,
                allowed=(low * reference, high * reference),
            )
        )
    if abs(mean) > std:
        failures.append(
            _failure(
                "scale",
                name,
                f"mean {mean:.4g} ({source}) exceeds the std {std:.4g}, so the "
                f"weights of this {type(item.entry.module).__name__} are far from "
                f"zero-centered; {hint}",
                rule,
                measured=mean,
                expected=0.0,
                allowed=(-std, std),
            )
        )
    return failures


def _range_text(bounds: tuple[float, float]) -> str:
    return f"[{bounds[0]:.4g}, {bounds[1]:.4g}]"


def _expect_failures(
    item: PlannedTensor, mean: float, std: float, max_abs: float | None, source: str
) -> list[CheckFailure]:
    expect = item.match.rule.expect
    if expect is None:
        return []
    name = item.label
    rule = item
    failures = []
    for quantity, value, bounds in (
        ("mean", mean, expect.mean),
        ("std", std, expect.std),
    ):
        if bounds is None:
            continue
        low, high = bounds
        if not low <= value <= high:
            failures.append(
                _failure(
                    "expect",
                    name,
                    f"{quantity} {value:.4g} ({source}) is outside the rule's "
                    f"expected {_range_text((low, high))}",
                    rule,
                    measured=value,
                    allowed=(low, high),
                )
            )
    if expect.max_abs is not None and max_abs is not None and max_abs > expect.max_abs:
        failures.append(
            _failure(
                "expect",
                name,
                f"largest magnitude {max_abs:.4g} ({source}) exceeds the rule's "
                f"max_abs {expect.max_abs:.4g}",
                rule,
                measured=max_abs,
                allowed=(0.0, expect.max_abs),
            )
        )
    return failures


class Expectations:
    """The expected statistics of planned tensors, each computed once.

    :func:`expected_for` depends only on an item's scheme, arguments, shape
    and zeroed rows. The tensors of a deep model share a few rules and
    shapes, and the expected statistics of one cost microseconds.
    """

    def __init__(self) -> None:
        self._known: dict[
            tuple[int, int, tuple[int, ...], int],
            tuple[object, object, ExpectedStats | None],
        ] = {}

    def of(self, item: PlannedTensor, zeroed_rows: int = 0) -> ExpectedStats | None:
        """Return what ``item`` should hold after its scheme ran."""
        scheme, args = item.scheme, item.args
        key = (id(scheme), id(args), item.shape, zeroed_rows)
        known = self._known.get(key)
        # The objects are kept and compared, since an id may be reused.
        if known is not None and known[0] is scheme and known[1] is args:
            return known[2]
        expected = expected_for(item, zeroed_rows)
        self._known[key] = (scheme, args, expected)
        return expected


def plan_failures(
    plan: Plan, expectations: Expectations | None = None
) -> list[CheckFailure]:
    """Return the checks that the rules' arguments fail before anything is written.

    Covers the plausible-scale check of random schemes with known statistics
    and the ``expect`` bounds that the arguments alone already break.
    """
    checks = plan.policy.checks
    if not checks.enabled:
        return []
    if expectations is None:
        expectations = Expectations()
    failures: list[CheckFailure] = []
    switches_of: dict[int, Switches] = {}
    for item in plan.planned:
        expected = expectations.of(item)
        if expected is None:
            continue
        source = "the arguments imply"
        switches = switches_of.get(item.match.rule_index)
        if switches is None:
            switches = switches_of[item.match.rule_index] = switches_for(
                checks, item.match.rule
            )
        if switches.scale and item.scheme.random and item.target.dim() >= 2:
            failures += _scale_failures(
                item, checks, expected.mean, expected.std, source
            )
        reach = None
        if expected.support is not None:
            reach = max(abs(expected.support[0]), abs(expected.support[1]))
        elif expected.std == 0:
            reach = abs(expected.mean)
        failures += _expect_failures(item, expected.mean, expected.std, reach, source)
    return failures


# Thousands of tensors share a few values and dtypes, and a round trip
# through a torch tensor costs microseconds.
@functools.lru_cache(maxsize=1024)
def _round_to(value: float, dtype: torch.dtype) -> float:
    """Return ``value`` as the tensor's dtype stores it."""
    if not dtype.is_floating_point:
        return value
    return float(torch.tensor(value, dtype=torch.float64).to(dtype))


@functools.cache
def _epsilon(dtype: torch.dtype) -> float:
    if dtype.is_floating_point:
        return float(torch.finfo(dtype).eps)
    return 0.0


def _half_spacing(value: float, dtype: torch.dtype) -> float:
    """Return half the gap between floats of ``dtype`` near ``value``.

    Draws within this distance below a bound can round onto it.
    """
    info = torch.finfo(dtype)
    if value == 0:
        return float(info.tiny)
    return float(info.eps) * 2.0 ** math.floor(math.log2(abs(value))) / 2


@functools.lru_cache(maxsize=4096)
def _margins(
    expected: ExpectedStats, numel: int, dtype: torch.dtype, tolerance: float
) -> tuple[float, float]:
    """Return how far the measured mean and std may stray from ``expected``.

    Cached: the tensors of one rule and shape share their margins.
    """
    # Rounding each value to the dtype is unbiased, so its effect on the mean
    # and std shrinks with the number of values. The statistics themselves
    # are computed in float32 or wider.
    rounding = _ROUNDING_UNITS * (
        _epsilon(torch.float32) + _epsilon(dtype) / math.sqrt(numel)
    )
    scale = abs(expected.mean) + expected.std
    mean_margin = tolerance * expected.std / math.sqrt(numel) + rounding * scale
    spread = math.sqrt(max(expected.kurtosis - 1, 0.1) / (4 * numel))
    std_margin = tolerance * expected.std * spread + rounding * scale
    return mean_margin, std_margin


def _statistics_failures(
    item: PlannedTensor, measured: Measured, expected: ExpectedStats, tolerance: float
) -> list[CheckFailure]:
    tensor = item.target
    numel = tensor.numel()
    name = item.label
    rule = item
    scheme = item.scheme.name
    if expected.std == 0:
        target = _round_to(expected.mean, tensor.dtype)
        if measured.min == target and measured.max == target:
            return []
        values = tensor.detach()
        differ = int(torch.count_nonzero(values != target))
        return [
            _failure(
                "statistics",
                name,
                f"{scheme} should set every value to {target!r}, but {differ} of "
                f"{numel} values differ (they range over [{measured.min!r}, "
                f"{measured.max!r}])",
                rule,
                measured=measured.max if measured.max != target else measured.min,
                expected=target,
            )
        ]
    mean_margin, std_margin = _margins(expected, numel, tensor.dtype, tolerance)
    failures = []
    if abs(measured.mean - expected.mean) > mean_margin:
        failures.append(
            _failure(
                "statistics",
                name,
                f"mean {measured.mean:.4g}, but {scheme} gives {expected.mean:.4g} "
                f"(accepted within {mean_margin:.2g} for {numel} values)",
                rule,
                measured=measured.mean,
                expected=expected.mean,
                allowed=(expected.mean - mean_margin, expected.mean + mean_margin),
            )
        )
    if numel < 2:
        return failures
    if abs(measured.std - expected.std) > std_margin:
        failures.append(
            _failure(
                "statistics",
                name,
                f"std {measured.std:.4g}, but {scheme} gives {expected.std:.4g} "
                f"(accepted within {std_margin:.2g} for {numel} values)",
                rule,
                measured=measured.std,
                expected=expected.std,
                allowed=(expected.std - std_margin, expected.std + std_margin),
            )
        )
    return failures


# Rows compared by the orthogonality check: enough to catch a matrix that is
# not orthogonal, few enough that the Gram matrix costs next to nothing.
_GRAM_ROWS = 64


def _orthogonality_failures(item: PlannedTensor) -> list[CheckFailure]:
    """Check that the first rows (or columns) of an orthogonal draw are orthonormal.

    A matrix with the right std but correlated rows passes the statistics
    check, so the Gram matrix of up to 64 rows of the flattened matrix (of
    its transpose when it has more rows than columns) is compared with
    gain**2 times the identity.
    """
    if item.scheme.name != "orthogonal":
        return []
    gain = getattr(item.args, "gain", 1.0)
    tensor = item.target.detach()
    if gain == 0 or tensor.numel() == 0:
        return []
    matrix = tensor.reshape(tensor.shape[0], -1).double()
    if matrix.shape[0] > matrix.shape[1]:
        matrix = matrix.t()
    rows = matrix[:_GRAM_ROWS]
    gram = rows @ rows.t() / (gain * gain)
    identity = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    error = float((gram - identity).abs().max())
    # Rounding each value to the dtype moves an entry of the Gram matrix by
    # well under 4 epsilons (measured up to 0.26 eps for bfloat16).
    limit = max(_ROUNDING_UNITS * _epsilon(tensor.dtype), 1e-5)
    if error <= limit:
        return []
    return [
        _failure(
            "statistics",
            item.label,
            f"the first {gram.shape[0]} rows of the orthogonal matrix are not "
            f"orthonormal: their Gram matrix differs from gain**2 * I by up to "
            f"{error:.3g} (accepted: {limit:.2g})",
            item,
            measured=error,
            expected=0.0,
            allowed=(0.0, limit),
        )
    ]


def _exact_failures(item: PlannedTensor) -> list[CheckFailure]:
    """Compare ``eye`` and ``dirac`` tensors with the values they must hold."""
    name = item.scheme.name
    if name not in ("eye", "dirac"):
        return []
    tensor = item.target.detach()
    reference = torch.empty_like(tensor)
    if name == "eye":
        nn.init.eye_(reference)
    else:
        nn.init.dirac_(reference, getattr(item.args, "groups", 1))
    differ = int(torch.count_nonzero(tensor != reference))
    if differ == 0:
        return []
    return [
        _failure(
            "statistics",
            item.label,
            f"{differ} of {tensor.numel()} values differ from what {name} writes",
            item,
            measured=float(differ),
            expected=0.0,
        )
    ]


def _sparsity_failures(item: PlannedTensor) -> list[CheckFailure]:
    """Check that ``sparse`` left its share of zeros in every column."""
    args = item.args
    if item.scheme.name != "sparse" or not isinstance(args, SparseArgs):
        return []
    tensor = item.target.detach()
    required = math.ceil(args.sparsity * tensor.shape[0])
    if required == 0 or tensor.numel() == 0:
        return []
    fewest = int((tensor == 0).sum(dim=0).min())
    if fewest >= required:
        return []
    return [
        _failure(
            "statistics",
            item.label,
            f"a column has {fewest} zeros, but sparse with sparsity "
            f"{args.sparsity:g} zeroes {required} of the {tensor.shape[0]} values "
            "in every column",
            item,
            measured=float(fewest),
            expected=float(required),
        )
    ]


def _bounds_failures(
    item: PlannedTensor, measured: Measured, expected: ExpectedStats, tolerance: float
) -> list[CheckFailure]:
    if expected.support is None:
        return []
    tensor = item.target
    dtype = tensor.dtype
    name = item.label
    rule = item
    # Rounding is monotone, so every draw inside [a, b] lands inside the
    # rounded bounds, which may lie just outside [a, b].
    low, high = (_round_to(bound, dtype) for bound in expected.support)
    if measured.min < low or measured.max > high:
        return [
            _failure(
                "bounds",
                name,
                f"values range over {_range_text((measured.min, measured.max))}, "
                f"outside the bounds {_range_text((low, high))} of "
                f"{item.scheme.name}",
                rule,
                measured=measured.min if measured.min < low else measured.max,
                allowed=(low, high),
            )
        ]
    if measured.min > low and measured.max < high:
        return []
    on_bounds = int(torch.count_nonzero((tensor == low) | (tensor == high)))
    numel = tensor.numel()
    density_low, density_high = expected.edge_density
    true_low, true_high = expected.support
    # Draws round onto a bound from within half a float spacing of it, and,
    # when the bound itself rounds inward, from the whole gap to the true one.
    low_width = _half_spacing(low, dtype) + max(low - true_low, 0.0)
    high_width = _half_spacing(high, dtype) + max(true_high - high, 0.0)
    rounded = numel * (density_low * low_width + density_high * high_width)
    limit = rounded + tolerance * math.sqrt(rounded) + _BOUND_SLACK
    if on_bounds <= limit:
        return []
    return [
        _failure(
            "bounds",
            name,
            f"{on_bounds} of {numel} values ({100 * on_bounds / numel:.3g}%) lie "
            f"exactly on the bounds {_range_text((low, high))} of "
            f"{item.scheme.name}, but rounding to {str(dtype).removeprefix('torch.')} "
            f"explains at most {limit:.0f}; the draw was clamped, not truncated",
            rule,
            measured=float(on_bounds),
            allowed=(0.0, limit),
        )
    ]


def reads_values(
    item: PlannedTensor, measured: Measured | None, expected: ExpectedStats | None
) -> bool:
    """Return True if :func:`tensor_failures` reads the tensor's values.

    Most checks need only the statistics; a sharded tensor is gathered
    whole on every rank only for those that do not.
    """
    if item.scheme.name in ("orthogonal", "sparse", "eye", "dirac"):
        return True
    if measured is None or not measured.finite:
        return True
    if expected is None:
        return False
    dtype = item.entry.tensor.dtype
    if expected.std == 0:
        target = _round_to(expected.mean, dtype)
        return not measured.min == measured.max == target
    if expected.support is not None:
        low, high = (_round_to(bound, dtype) for bound in expected.support)
        return not low < measured.min <= measured.max < high
    return False


def tensor_failures(
    item: PlannedTensor,
    measured: Measured | None,
    expected: ExpectedStats | None,
    checks: Checks,
    *,
    judge_arguments: bool = False,
    switches: Switches | None = None,
) -> list[CheckFailure]:
    """Return the checks that a tensor's values fail.

    Args:
        item: The planned tensor, holding its values now.
        measured: Its statistics, from :func:`measure`.
        expected: What its scheme should give, from :func:`expected_for`.
        checks: The policy's ``checks`` section.
        judge_arguments: Also run the checks that :func:`plan_failures` runs
            on the arguments (for a model initialized elsewhere); otherwise
            the scale check here covers only schemes without known statistics.
        switches: The rule's switches, when the caller has them already.
    """
    if switches is None:
        switches = switches_for(checks, item.match.rule)
    if measured is None:
        return []
    max_abs = max(abs(measured.min), abs(measured.max))
    expect = _expect_failures(item, measured.mean, measured.std, max_abs, "measured")
    if not item.scheme.writes and not judge_arguments:
        # A kept tensor contains what the user put there, so only its rule's own
        # bounds apply.
        return expect
    name = item.label
    failures: list[CheckFailure] = []
    if not measured.finite:
        if switches.finite:
            values = item.target.detach()
            bad = int(values.numel() - torch.count_nonzero(torch.isfinite(values)))
            failures.append(
                _failure(
                    "finite",
                    name,
                    f"{bad} of {values.numel()} values are NaN or Inf",
                    item,
                    measured=float(bad),
                    expected=0.0,
                )
            )
        return failures
    if switches.statistics:
        failures += _exact_failures(item)
    if expected is not None:
        if switches.statistics:
            failures += _statistics_failures(item, measured, expected, checks.tolerance)
            failures += _orthogonality_failures(item)
            failures += _sparsity_failures(item)
        if switches.bounds:
            failures += _bounds_failures(item, measured, expected, checks.tolerance)
    # `default` runs the module's own init and `lsuv` sets the scale from
    # data: the user chose those scales, so the scale check leaves them alone.
    chosen = item.scheme.needs_module_reset or item.scheme.needs_data
    is_weight = item.scheme.random and item.target.dim() >= 2 and not chosen
    if switches.scale and is_weight and (expected is None or judge_arguments):
        failures += _scale_failures(
            item, checks, measured.mean, measured.std, "measured"
        )
    return failures + expect


def _current(module: nn.Module, local_name: str, kind: str) -> torch.Tensor | None:
    store = module._parameters if kind == "parameter" else module._buffers
    return store.get(local_name)


def _declared_ties(model: nn.Module) -> dict[str, str]:
    """Return the ties a transformers model declares, target name to source name.

    transformers (5.x) lists them in ``all_tied_weights_keys``, which is
    empty when the config unties the weights. Other models declare none.
    """
    declared: dict[str, str] = {}
    for prefix, module, _ in walk_modules(model):
        if prefix:
            break
        keys = getattr(module, "all_tied_weights_keys", None)
        if isinstance(keys, dict):
            declared = {
                str(target): str(source)
                for target, source in keys.items()
                if isinstance(target, str) and isinstance(source, str)
            }
    return declared


def tie_failures(plan: Plan, model: nn.Module) -> list[CheckFailure]:
    """Return the ties that no longer hold.

    A tie holds when every alias found before init still names the same
    tensor, and when the tensors that a transformers model declares tied
    (``lm_head.weight`` and the input embedding) are one tensor.
    """
    if not (plan.policy.checks.enabled and plan.policy.checks.ties):
        return []
    entries = [item.entry for item in plan.planned]
    entries += plan.unmatched
    entries += [item.entry for item in plan.skipped]
    failures = []
    by_name: dict[str, torch.Tensor] = {}
    for entry in entries:
        by_name[entry.name] = entry.tensor
        if entry.parametrization is not None:
            # Its aliases share one parametrization, not one Parameter.
            continue
        owners = zip(entry.aliases, entry.alias_modules, entry.alias_infos, strict=True)
        for alias, module, info in owners:
            by_name[alias] = entry.tensor
            if _current(module, info.local_name, info.kind) is not entry.tensor:
                failures.append(
                    _failure(
                        "ties",
                        alias,
                        f"is no longer the same tensor as {entry.name!r}, to which "
                        "it was tied before init",
                        None,
                    )
                )
    for target, source in _declared_ties(model).items():
        target_tensor = by_name.get(target)
        source_tensor = by_name.get(source)
        if target_tensor is None or source_tensor is None:
            continue
        if target_tensor is not source_tensor:
            failures.append(
                _failure(
                    "ties",
                    target,
                    f"should be tied to {source!r} (the model declares the tie in "
                    "all_tied_weights_keys), but is a separate tensor; tie it again, "
                    "for example with model.tie_weights()",
                    None,
                )
            )
    return failures
