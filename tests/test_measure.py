"""Statistics of many tensors at once: measure_many against measure, and checks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import initrules
from initrules.checks import Measured, measure, measure_many


def _close(batched: Measured | None, alone: Measured | None) -> bool:
    if batched is None or alone is None:
        return batched is alone
    pairs = [
        (batched.mean, alone.mean, 1e-6 * (abs(alone.mean) + alone.std)),
        (batched.std, alone.std, 1e-6 * alone.std),
        (batched.min, alone.min, 0.0),
        (batched.max, alone.max, 0.0),
    ]
    for got, want, slack in pairs:
        if math.isnan(want):
            if not math.isnan(got):
                return False
        elif abs(got - want) > slack:
            return False
    return True


def _mixed_tensors() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(64, 64, generator=generator) * 0.02 for _ in range(40)]
    tensors += [torch.randn(172, 64, generator=generator) for _ in range(30)]
    tensors += [torch.ones(64) for _ in range(5)]
    tensors += [torch.randn(64, generator=generator).bfloat16() for _ in range(6)]
    tensors += [torch.randn(8, 8, dtype=torch.float64, generator=generator)] * 3
    # Odd ones out, each next to tensors of its own shape.
    tensors.append(torch.randn(64, 64, generator=generator) + 1e4)
    with_nan = torch.randn(64, 64, generator=generator)
    with_nan[3, 5] = math.nan
    tensors.append(with_nan)
    with_inf = torch.randn(64, 64, generator=generator)
    with_inf[0, 0] = math.inf
    tensors.append(with_inf)
    tensors += [
        torch.tensor([2.5]),
        torch.empty(0, 4),
        torch.arange(12).reshape(3, 4),
        torch.zeros(3, dtype=torch.bool),
        torch.randn(70_000, generator=generator),
    ]
    tensors.append(torch.randn(64, 64, generator=generator).t())  # not contiguous
    return tensors


def test_measure_many_matches_measure() -> None:
    tensors = _mixed_tensors()
    batched = measure_many(tensors)
    assert len(batched) == len(tensors)
    for index, (tensor, result) in enumerate(zip(tensors, batched, strict=True)):
        alone = measure(tensor)
        assert _close(result, alone), (index, tuple(tensor.shape), result, alone)


def test_large_mean_keeps_std_digits() -> None:
    generator = torch.Generator().manual_seed(1)
    # A mean 1e4 times the std loses the std to cancellation in float32
    # sums of squares; such rows are measured alone in float64.
    shifted = [torch.randn(4096, generator=generator) + 1e4 for _ in range(4)]
    for tensor, result in zip(shifted, measure_many(shifted), strict=True):
        want = float(tensor.double().std())
        assert result is not None
        assert result.std == pytest.approx(want, rel=1e-3)


def test_constant_rows_exact() -> None:
    tensors = [torch.full((64,), 0.1) for _ in range(8)]
    value = float(tensors[0][0])
    for result in measure_many(tensors):
        assert result == Measured(value, 0.0, value, value)


class _Deep(nn.Module):
    """Many equal small layers, so their statistics are measured in batches."""

    def __init__(self, depth: int = 48, width: int = 32) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))


_POLICY = """
rules:
  - {match: {param: weight}, init: {scheme: kaiming_normal, nonlinearity: linear}}
  - {match: {param: bias}, init: zeros}
"""


def test_check_flags_only_bad_layers() -> None:
    model = _Deep()
    policy = initrules.load_policy(text=_POLICY)
    initrules.apply(model, policy, seed=0)
    with torch.no_grad():
        model.layers[17].weight.mul_(1.5)
        model.layers[30].bias[4] = math.nan
    report = initrules.check(model, policy)
    flagged = {(failure.check, failure.tensor) for failure in report.failures}
    assert flagged == {
        ("statistics", "layers.17.weight"),
        ("finite", "layers.30.bias"),
    }


def test_rows_carry_own_statistics() -> None:
    model = _Deep()
    policy = initrules.load_policy(text=_POLICY)
    report = initrules.apply(model, policy, seed=0)
    rows = {row.name: row for row in report.rows}
    for index in (0, 23, 47):
        weight = model.layers[index].weight.detach().double()
        row = rows[f"layers.{index}.weight"]
        assert row.mean == pytest.approx(float(weight.mean()), abs=1e-7)
        assert row.std == pytest.approx(float(weight.std()), rel=1e-6)
        assert row.min == float(weight.min())
        assert row.max == float(weight.max())


_BIG_POLICY = """
rules:
  - {match: {param: weight}, init: {scheme: normal, std: 0.02}}
  - {match: {param: bias}, init: {scheme: uniform, a: -0.1, b: 0.1}}
"""


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_rows_match_measure(dtype: torch.dtype) -> None:
    # Three stream chunks and seven rows more, so the statistics are taken
    # chunk by chunk while the tensor is drawn.
    model = nn.Linear(1024, 3 * 1024 + 7).to(dtype)
    policy = initrules.load_policy(text=_BIG_POLICY)
    report = initrules.apply(model, policy, seed=3)
    row = report.rows_of("weight")[0]
    alone = measure(model.weight)
    assert alone is not None
    assert row.mean == pytest.approx(alone.mean, abs=1e-7)
    assert row.std == pytest.approx(alone.std, rel=1e-6)
    assert row.min == alone.min
    assert row.max == alone.max
    assert report.ok


def test_chunked_rows_thread_independent() -> None:
    policy = initrules.load_policy(text=_BIG_POLICY)
    threads = torch.get_num_threads()
    rows = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            report = initrules.apply(nn.Linear(1024, 2048 + 5), policy, seed=1)
            rows.append(report.rows_of("weight")[0])
    finally:
        torch.set_num_threads(threads)
    serial, parallel = rows
    # Torch splits a float32 sum by thread, so the last digits may differ.
    assert serial.mean == pytest.approx(parallel.mean, rel=1e-5)
    assert serial.std == pytest.approx(parallel.std, rel=1e-6)
    assert serial.min == parallel.min
    assert serial.max == parallel.max


def test_padding_row_measured_after_zeroing() -> None:
    model = nn.Embedding(3000, 512, padding_idx=0)
    policy = initrules.load_policy(
        text="rules:\n  - {match: {param: weight}, init: {scheme: normal, std: 1.0}}\n"
    )
    report = initrules.apply(model, policy, seed=0)
    row = report.rows[0]
    alone = measure(model.weight)
    assert alone is not None
    assert float(model.weight.detach()[0].abs().max()) == 0.0
    assert row.mean == pytest.approx(alone.mean, abs=1e-7)
    assert row.std == pytest.approx(alone.std, rel=1e-6)


class _Overlap(nn.Module):
    """Two parameters cut from one buffer, sharing rows 2000 to 3999."""

    def __init__(self) -> None:
        super().__init__()
        base = torch.zeros(6000, 512)
        self.first = nn.Parameter(base[0:4000])
        self.second = nn.Parameter(base[2000:6000])


_OVERLAP_POLICY = """
rules:
  - {match: {name: first}, init: {scheme: normal, std: 0.02}}
  - {match: {name: second}, init: {scheme: uniform, a: -0.02, b: 0.02}}
checks: {on_failure: warn}
"""


def test_overlapping_parameters_written_in_order() -> None:
    policy = initrules.load_policy(text=_OVERLAP_POLICY)
    threads = torch.get_num_threads()
    results = []
    try:
        torch.set_num_threads(2)
        for _ in range(4):
            model = _Overlap()
            with pytest.warns(initrules.InitRulesWarning):
                report = initrules.apply(model, policy, seed=0)
            results.append(model.first.detach().clone())
            # The later parameter overwrote the shared rows, in module order.
            shared = model.first.detach()[2000:]
            assert float(shared.abs().max()) <= 0.02
            alone = measure(model.first)
            assert alone is not None
            assert report.rows_of("first")[0].std == pytest.approx(alone.std, rel=1e-6)
    finally:
        torch.set_num_threads(threads)
    for result in results[1:]:
        assert torch.equal(result, results[0])


def test_moderate_mean_rows_keep_digits() -> None:
    generator = torch.Generator().manual_seed(2)
    tensors = [torch.randn(4096, generator=generator) * 0.01 + 0.3 for _ in range(8)]
    for tensor, result in zip(tensors, measure_many(tensors), strict=True):
        assert result is not None
        assert result.std == pytest.approx(float(tensor.double().std()), rel=1e-6)


def test_huge_values_measured_finite() -> None:
    generator = torch.Generator().manual_seed(3)
    small = [torch.randn(4096, generator=generator) * 1e20 for _ in range(3)]
    large = torch.randn(3 << 20, generator=generator) * 1e19
    for tensor, result in zip(
        [*small, large], measure_many([*small, large]), strict=True
    ):
        assert result is not None
        assert result.finite
        assert result.std == pytest.approx(float(tensor.double().std()), rel=1e-5)
