import math

import pytest
import torch
from torch import nn

import initrules
from initrules.expected import ExpectedStats, expected_stats

# (init mapping, tensor shape); each tensor has 16k to 260k elements, so the
# sample moments sit well inside five standard errors of the population ones.
CASES = [
    ("{scheme: uniform, a: -0.3, b: 0.5}", (256, 256)),
    ("{scheme: normal, mean: 0.1, std: 0.02}", (256, 256)),
    ("{scheme: trunc_normal, std: 0.02, a: -0.04, b: 0.04}", (256, 256)),
    ("{scheme: trunc_normal, mean: 0.5, std: 1.0, a: 0.0, b: 3.0}", (256, 256)),
    ("{scheme: xavier_uniform, gain: 2.0}", (128, 512)),
    ("{scheme: xavier_normal}", (64, 32, 3, 3)),
    ("{scheme: kaiming_uniform, a: 2.236}", (256, 128)),
    ("{scheme: kaiming_normal, mode: fan_out, nonlinearity: relu}", (64, 32, 3, 3)),
    ("{scheme: kaiming_normal, nonlinearity: tanh}", (256, 128)),
    ("{scheme: orthogonal, gain: 1.5}", (128, 512)),
    ("{scheme: orthogonal}", (512, 128)),
    ("{scheme: sparse, sparsity: 0.3, std: 0.05}", (200, 300)),
    ("{scheme: variance_scaling, scale: 2.0, mode: fan_avg}", (256, 128)),
    ("{scheme: variance_scaling, distribution: uniform}", (256, 128)),
    ("lecun_normal", (256, 128)),
    ("{scheme: constant, val: 0.25}", (16, 16)),
    ("ones", (16,)),
    ("zeros", (16,)),
]


def draw(init: str, shape: tuple[int, ...]) -> tuple[torch.Tensor, initrules.Row]:
    holder = nn.Module()
    holder.weight = nn.Parameter(torch.empty(shape))
    policy = initrules.load_policy(text=f"rules:\n  - match: {{}}\n    init: {init}\n")
    report = initrules.apply(holder, policy, seed=11)
    return holder.weight.detach(), report.row("weight")


@pytest.mark.parametrize(("init", "shape"), CASES, ids=[init for init, _ in CASES])
def test_expected_matches_draw(init: str, shape: tuple[int, ...]) -> None:
    tensor, row = draw(init, shape)
    assert row.expected_std is not None, "no expected statistics"
    assert row.expected_mean is not None
    count = tensor.numel()
    measured_std = tensor.std().item()
    # Sparse draws are heavy-tailed (many zeros), so their std varies more.
    sigmas = 10 if "sparse" in init else 5
    std_tolerance = sigmas * row.expected_std / math.sqrt(2 * count) + 1e-12
    mean_tolerance = sigmas * row.expected_std / math.sqrt(count) + 1e-12
    assert abs(measured_std - row.expected_std) <= std_tolerance, (
        f"std {measured_std:.6g}, expected {row.expected_std:.6g}"
    )
    assert abs(tensor.mean().item() - row.expected_mean) <= mean_tolerance, (
        f"mean {tensor.mean().item():.6g}, expected {row.expected_mean:.6g}"
    )


def test_five_percent_error_is_outside_tolerance() -> None:
    # The tolerance above must be tight enough to catch a wrong std.
    tensor, _ = draw("{scheme: normal, std: 0.021}", (256, 256))
    expected = expected_stats(
        "normal",
        (256, 256),
        initrules.load_policy(
            text="rules: [{match: {}, init: {scheme: normal, std: 0.02}}]"
        )
        .rules[0]
        .init.args,
    )
    assert expected == ExpectedStats(0.0, 0.02)
    tolerance = 5 * expected.std / math.sqrt(2 * tensor.numel())
    assert abs(tensor.std().item() - expected.std) > tolerance


@pytest.mark.parametrize("init", ["keep", "eye", "default"])
def test_unknown_statistics_are_none(init: str) -> None:
    holder = nn.Linear(8, 8, bias=False)
    policy = initrules.load_policy(text=f"rules:\n  - match: {{}}\n    init: {init}\n")
    report = initrules.apply(holder, policy, seed=0)
    assert report.row("weight").expected_std is None


def test_table_shows_expected_std() -> None:
    _, row = draw("{scheme: normal, std: 0.02}", (64, 64))
    assert row.expected_std == 0.02
    holder = nn.Module()
    holder.weight = nn.Parameter(torch.empty(64, 64))
    report = initrules.apply(
        holder,
        initrules.load_policy(
            text="rules: [{match: {}, init: {scheme: normal, std: 0.02}}]"
        ),
        seed=0,
    )
    header, line = str(report).splitlines()[1:3]
    assert "expected std" in header
    assert line.split()[-3] == "0.02"
