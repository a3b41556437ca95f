"""Parametrized tensors, lazy modules and buffer rules, on real torch.nn modules."""

import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import orthogonal, spectral_norm, weight_norm

import initrules

WEIGHT_STD = 0.05
POLICY_TEXT = f"""
rules:
  - name: linear weights
    match: {{module: Linear, param: weight, exact: true}}
    init: {{scheme: normal, std: {WEIGHT_STD}}}
  - name: biases
    match: {{param: bias}}
    init: zeros
"""


def policy(text: str = POLICY_TEXT) -> initrules.Policy:
    return initrules.load_policy(text=text)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), name


def std_tolerance(std: float, numel: int) -> float:
    # Five standard errors of a normal sample's std.
    return 5 * std / math.sqrt(2 * numel)


# --- weight_norm --------------------------------------------------------------------


def test_weight_norm_effective_weight() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(weight_norm(nn.Linear(256, 128)))
    report = initrules.apply(model, policy(), seed=0)

    row = report.row("0.weight")
    assert row.module_type == "Linear"
    assert row.rule_name == "linear weights"
    assert row.note == "written through its parametrization"
    effective = model[0].weight.detach()
    assert abs(float(effective.std()) - WEIGHT_STD) < std_tolerance(
        WEIGHT_STD, effective.numel()
    )
    # The report measured the effective weight, which the module computes.
    assert row.std == pytest.approx(float(effective.double().std()), rel=1e-6)
    # weight_norm keeps the direction in original1 and the row norms in original0.
    direction = model[0].parametrizations.weight.original1.detach()
    norms = model[0].parametrizations.weight.original0.detach()
    assert torch.allclose(norms.squeeze(1), direction.norm(dim=1), rtol=1e-5)
    assert report.ok


def test_weight_norm_seeded_canonical_names() -> None:
    first = nn.Sequential(weight_norm(nn.Linear(16, 8)))
    second = nn.Sequential(weight_norm(nn.Linear(16, 8)))
    report = initrules.apply(first, policy(), seed=3)
    initrules.apply(second, policy(), seed=3)
    assert torch.equal(first[0].weight, second[0].weight)
    names = [row.name for row in report.rows]
    assert names == ["0.weight", "0.bias"]
    assert report.unmatched == []


def test_weight_norm_through_build() -> None:
    model, report = initrules.build(
        lambda: nn.Sequential(weight_norm(nn.Linear(64, 32))), policy(), seed=0
    )
    assert report.row("0.weight").note == "written through its parametrization"
    assert torch.isfinite(model[0].weight).all()
    assert not model[0].parametrizations.weight.original1.is_meta


# --- parametrizations that change the values -----------------------------------------


def test_spectral_norm_judges_the_draw() -> None:
    model = nn.Sequential(spectral_norm(nn.Linear(64, 32)))
    report = initrules.apply(model, policy(), seed=0)
    row = report.row("0.weight")
    assert row.note.startswith(
        "written through its parametrization (_SpectralNorm), which changes the "
        "values: the effective tensor differs from the draw by up to "
    )
    assert row.note.endswith("; the checks judge the draw")
    # The original contains the draw, and the module divides it by its top
    # singular value.
    original = model[0].parametrizations.weight.original.detach()
    assert row.std == pytest.approx(float(original.double().std()), rel=1e-6)
    assert report.ok


def test_orthogonal_parametrization_keeps_its_constraint() -> None:
    model = nn.Sequential(orthogonal(nn.Linear(16, 16)))
    text = """
rules:
  - match: {module: Linear, param: weight}
    init: orthogonal
  - match: {param: bias}
    init: zeros
"""
    report = initrules.apply(model, policy(text), seed=0)
    weight = model[0].weight.detach().double()
    assert torch.allclose(
        weight @ weight.T, torch.eye(16, dtype=torch.float64), atol=1e-5
    )
    assert report.ok


class Doubled(nn.Module):
    """A parametrization without right_inverse: nothing can be written through it."""

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        return 2 * value


def test_parametrization_without_right_inverse_is_plan_error() -> None:
    linear = nn.Linear(4, 3)
    parametrize.register_parametrization(linear, "weight", Doubled())
    model = nn.Sequential(linear)
    before = snapshot(model)
    with pytest.raises(initrules.PlanError) as caught:
        initrules.apply(model, policy(), seed=0)
    assert str(caught.value) == (
        "rule 1 'linear weights' at <text>:3:5 cannot initialize '0.weight' (shape "
        "(3, 4), float32): the parametrization Doubled has no right_inverse, so no "
        "value can be written through it; choose another scheme, or remove the "
        "parametrization before init"
    )
    assert_unchanged(model, before)


def test_default_scheme_on_parametrized_tensor_is_plan_error() -> None:
    model = nn.Sequential(weight_norm(nn.Linear(4, 3)))
    before = snapshot(model)
    text = "rules:\n  - match: {param: weight}\n    init: default\n"
    text += "  - match: {param: bias}\n    init: zeros\n"
    with pytest.raises(initrules.PlanError) as caught:
        initrules.apply(model, policy(text), seed=0)
    assert "default writes the module's tensor in place" in str(caught.value)
    assert_unchanged(model, before)


def test_skip_loaded_maps_parametrized_storage_names() -> None:
    source = nn.Sequential(weight_norm(nn.Linear(8, 4)), weight_norm(nn.Linear(4, 2)))
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("1.")}
    model = nn.Sequential(weight_norm(nn.Linear(8, 4)), weight_norm(nn.Linear(4, 2)))
    result = model.load_state_dict(state, strict=False)
    assert "1.parametrizations.weight.original0" in result.missing_keys

    report = initrules.apply(model, policy(), seed=0, skip_loaded=result)

    assert [row.name for row in report.rows] == ["1.weight", "1.bias"]
    for name, value in state.items():
        assert torch.equal(model.state_dict()[name], value), name


# --- lazy modules ---------------------------------------------------------------------


def test_lazy_tensors_are_reported_and_the_rest_initialized(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.LazyLinear(3))
    with caplog.at_level("WARNING", logger="initrules.planner"):
        report = initrules.apply(model, policy(), seed=0)

    assert [row.name for row in report.rows] == ["0.weight", "0.bias"]
    reasons = {skipped.name: skipped.reason for skipped in report.skipped}
    assert set(reasons) == {"1.weight", "1.bias"}
    assert reasons["1.weight"].startswith("lazy module, not materialized yet")
    assert "2 tensor(s) of lazy modules are not materialized" in caplog.text

    # After a forward pass gives them shapes, the same policy initializes them.
    model(torch.zeros(1, 4))
    report = initrules.apply(model, policy(), seed=0)
    assert report.row("1.weight").std == pytest.approx(WEIGHT_STD, rel=0.5)
    assert report.skipped == []


def test_build_rejects_lazy_modules() -> None:
    with pytest.raises(initrules.PlanError, match="lazy modules are not materialized"):
        initrules.build(lambda: nn.Sequential(nn.LazyLinear(3)), policy())


# --- buffers -----------------------------------------------------------------------


BATCH_NORM_POLICY = """
rules:
  - match: {module: Conv2d, param: weight}
    init: {scheme: kaiming_normal, mode: fan_out, nonlinearity: relu}
  - match: {module: BatchNorm2d, param: weight}
    init: ones
  - match: {module: BatchNorm2d, param: bias}
    init: zeros
  - name: running means
    match: {module: BatchNorm2d, param: running_mean, kind: buffer}
    init: {scheme: constant, val: 0.5}
  - name: running variances
    match: {module: BatchNorm2d, param: running_var, kind: buffer}
    init: {scheme: constant, val: 2.0}
"""


def test_buffer_rules_set_batch_norm_running_statistics() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8))
    report = initrules.apply(model, policy(BATCH_NORM_POLICY), seed=0)

    assert torch.equal(model[1].running_mean, torch.full((8,), 0.5))
    assert torch.equal(model[1].running_var, torch.full((8,), 2.0))
    row = report.row("1.running_mean")
    assert (row.kind, row.rule_name) == ("buffer", "running means")
    # The batch counter has no rule: listed as untouched, not as unmatched.
    assert report.untouched_buffers == ["1.num_batches_tracked"]
    assert report.unmatched == []
    assert int(model[1].num_batches_tracked) == 0


# --- edge cases ---------------------------------------------------------------------


def test_parametrized_kept_block() -> None:
    model = nn.Sequential(weight_norm(nn.Linear(4, 6)))
    before = model[0].weight.detach().clone()
    text = """
rules:
  - match: {param: weight, chunk: [1, 2]}
    init: {scheme: constant, val: 0.5}
  - match: {param: weight}
    init: keep
  - match: {param: bias}
    init: zeros
"""
    initrules.apply(model, policy(text), seed=0)
    weight = model[0].weight.detach()
    assert torch.allclose(weight[:3], before[:3], rtol=1e-5)
    assert torch.allclose(weight[3:], torch.full((3, 4), 0.5), rtol=1e-5)


def test_spectral_norm_state_untouched() -> None:
    model = nn.Sequential(spectral_norm(nn.Linear(8, 6)))
    before = snapshot(model)
    weights_only = policy("rules:\n  - match: {param: weight}\n    init: zeros\n")
    with pytest.raises(initrules.UnmatchedTensorsError):
        initrules.apply(model, weights_only, seed=0)
    initrules.check(model, policy())
    assert_unchanged(model, before)


def test_shared_parametrized_module_is_planned_once() -> None:
    shared = weight_norm(nn.Linear(4, 4))
    model = nn.Sequential(shared, nn.ReLU(), shared)
    report = initrules.apply(model, policy(), seed=0)
    assert [row.name for row in report.rows] == ["0.weight", "0.bias"]
    assert report.row("0.weight").aliases == ("2.weight",)
    assert report.ok


def test_weight_norm_bfloat16_note() -> None:
    model = nn.Sequential(weight_norm(nn.Linear(64, 32))).to(torch.bfloat16)
    report = initrules.apply(model, policy(), seed=0)
    assert report.row("0.weight").note == "written through its parametrization"
