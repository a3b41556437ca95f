"""Behaviour of the data-dependent ``lsuv`` scheme through `initrules.apply`.

Every model is a real `torch.nn` module or a small transformers ResNet built from
its config, every policy is YAML text or a file under `tmp_path`, and every batch
comes from a seeded generator. Output stds are measured here with forward hooks in
eval mode, independently of the library's own measurement.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import ResNetConfig, ResNetModel

import initrules
from initrules import LsuvResult, Report

LINEAR_LSUV = """\
rules:
  - match: {module: Linear, param: weight}
    init: {scheme: lsuv, base: orthogonal, target_std: %s, tol: %s, max_iter: 10}
  - match: {param: bias}
    init: zeros
"""


def load(text: str) -> initrules.Policy:
    return initrules.load_policy(text=textwrap.dedent(text))


def batch(*shape: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in model.state_dict().items()}


def changed_tensors(model: nn.Module, before: dict[str, torch.Tensor]) -> list[str]:
    after = model.state_dict()
    return [
        name for name, value in before.items() if not torch.equal(after[name], value)
    ]


def output_stds(model: nn.Module, kind: type[nn.Module], data: Any) -> dict[str, float]:
    """Measure each ``kind`` module's output std, leaving the model in eval mode."""
    stds: dict[str, float] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, kind):

            def record(
                _: nn.Module, inputs: Any, output: Any, name: str = name
            ) -> None:
                stds.setdefault(name, float(output.float().std()))

            handles.append(module.register_forward_hook(record))
    model.eval()
    try:
        with torch.no_grad():
            if isinstance(data, dict):
                model(**data)
            else:
                model(data)
    finally:
        for handle in handles:
            handle.remove()
    return stds


def deep_mlp(activation: Callable[[], nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(16):
        layers += [nn.Linear(128, 128), activation()]
    return nn.Sequential(*layers)


# Deep MLP.


MLP_CASES = [
    pytest.param((nn.ReLU, 1.0, 0.1), id="relu-1.0"),
    pytest.param((nn.Tanh, 1.0, 0.1), id="tanh-1.0"),
    pytest.param((nn.ReLU, 0.5, 0.02), id="relu-0.5"),
]


@pytest.fixture(scope="module", params=MLP_CASES)
def mlp_run(
    request: pytest.FixtureRequest,
) -> tuple[nn.Sequential, Report, torch.Tensor, float, float]:
    activation, target, tol = request.param
    torch.manual_seed(1)
    model = deep_mlp(activation)
    data = batch(256, 128)
    report = initrules.apply(
        model, load(LINEAR_LSUV % (target, tol)), seed=0, data=data
    )
    return model, report, data, target, tol


def test_mlp_output_std_within_tol(
    mlp_run: tuple[nn.Sequential, Report, torch.Tensor, float, float],
) -> None:
    model, _, data, target, tol = mlp_run
    stds = output_stds(model, nn.Linear, data)
    assert len(stds) == 16
    for name, std in stds.items():
        assert abs(std - target) <= tol, f"layer {name}: output std {std}"


def test_mlp_reported_std_matches_measured(
    mlp_run: tuple[nn.Sequential, Report, torch.Tensor, float, float],
) -> None:
    model, report, data, _, _ = mlp_run
    stds = output_stds(model, nn.Linear, data)
    for result in report.lsuv:
        assert result.output_std == pytest.approx(stds[result.module], rel=1e-5)


def test_mlp_iterations_within_max_iter(
    mlp_run: tuple[nn.Sequential, Report, torch.Tensor, float, float],
) -> None:
    _, report, _, _, _ = mlp_run
    for result in report.lsuv:
        assert 1 <= result.iterations <= 10, result


def test_mlp_results_converged(
    mlp_run: tuple[nn.Sequential, Report, torch.Tensor, float, float],
) -> None:
    _, report, _, _, _ = mlp_run
    not_converged = [result.name for result in report.lsuv if not result.converged]
    assert not_converged == []


def test_mlp_results_in_forward_order(
    mlp_run: tuple[nn.Sequential, Report, torch.Tensor, float, float],
) -> None:
    _, report, _, _, _ = mlp_run
    modules = [str(index) for index in range(0, 32, 2)]
    assert [result.module for result in report.lsuv] == modules
    assert [result.name for result in report.lsuv] == [f"{m}.weight" for m in modules]


def test_mlp_report_ok(
    mlp_run: tuple[nn.Sequential, Report, torch.Tensor, float, float],
) -> None:
    _, report, _, _, _ = mlp_run
    assert report.ok


def test_mlp_biases_stay_zero(
    mlp_run: tuple[nn.Sequential, Report, torch.Tensor, float, float],
) -> None:
    model, _, _, _, _ = mlp_run
    for name, value in model.named_parameters():
        if name.endswith("bias"):
            assert torch.count_nonzero(value) == 0, name


# ResNet.

RESNET_POLICY = """\
on_unmatched: error
rules:
  - match: {module: Conv2d, param: weight}
    init: {scheme: lsuv, base: orthogonal, target_std: 1.0, tol: 0.1, max_iter: 10}
  - match: {module: BatchNorm2d, param: weight}
    init: ones
  - match: {module: BatchNorm2d, param: bias}
    init: zeros
"""


@pytest.fixture(scope="module")
def resnet_run() -> tuple[ResNetModel, Report, dict[str, torch.Tensor]]:
    config = ResNetConfig(
        depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 32, 64], embedding_size=8
    )
    torch.manual_seed(2)
    model = ResNetModel(config)
    data = {"pixel_values": batch(4, 3, 32, 32, seed=3)}
    report = initrules.apply(model, load(RESNET_POLICY), seed=0, data=data)
    return model, report, data


def test_resnet_tunes_every_conv(
    resnet_run: tuple[ResNetModel, Report, dict[str, torch.Tensor]],
) -> None:
    model, report, _ = resnet_run
    convs = {
        name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)
    }
    assert {result.module for result in report.lsuv} == convs
    assert len(report.lsuv) == len(convs)


def test_resnet_conv_std_within_tol(
    resnet_run: tuple[ResNetModel, Report, dict[str, torch.Tensor]],
) -> None:
    model, _, data = resnet_run
    stds = output_stds(model, nn.Conv2d, data)
    assert len(stds) == 16
    for name, std in stds.items():
        assert abs(std - 1.0) <= 0.1, f"{name}: output std {std}"


def test_resnet_iterations_within_max_iter(
    resnet_run: tuple[ResNetModel, Report, dict[str, torch.Tensor]],
) -> None:
    _, report, _ = resnet_run
    for result in report.lsuv:
        assert 1 <= result.iterations <= 10, result


def test_resnet_report_ok(
    resnet_run: tuple[ResNetModel, Report, dict[str, torch.Tensor]],
) -> None:
    _, report, _ = resnet_run
    assert report.ok


def test_resnet_results_in_forward_order(
    resnet_run: tuple[ResNetModel, Report, dict[str, torch.Tensor]],
) -> None:
    model, report, data = resnet_run
    # output_stds fills its dict in the order the hooks fire.
    order = list(output_stds(model, nn.Conv2d, data))
    assert [result.module for result in report.lsuv] == order


# Model state.


class CallCounter(nn.Module):
    """Count forward calls in a buffer, updated in place."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        return x


class NoiseInjection(nn.Module):
    """Add small Gaussian noise from torch's global generator, in every mode."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.01 * torch.randn_like(x)


STATE_POLICY = """\
rules:
  - match: {module: Linear, param: weight}
    init: {scheme: lsuv}
  - match: {module: Linear, param: bias}
    init: zeros
  - match: {module: BatchNorm1d, param: weight}
    init: ones
  - match: {module: BatchNorm1d, param: bias}
    init: zeros
"""


def state_model() -> nn.Sequential:
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Linear(16, 32),
        nn.BatchNorm1d(32),
        nn.ReLU(),
        CallCounter(),
        NoiseInjection(),
        nn.Linear(32, 8),
    )
    model.train()
    with torch.no_grad():
        # Move the running statistics away from their defaults.
        model(batch(64, 16, seed=5) * 3 + 1)
    model[2].eval()
    return model


def test_data_pass_keeps_bn_statistics() -> None:
    model = state_model()
    norm = model[1]
    assert isinstance(norm, nn.BatchNorm1d)
    mean = norm.running_mean.clone()
    var = norm.running_var.clone()
    tracked = norm.num_batches_tracked.clone()

    initrules.apply(model, load(STATE_POLICY), seed=0, data=batch(64, 16))

    assert torch.equal(norm.running_mean, mean)
    assert torch.equal(norm.running_var, var)
    assert torch.equal(norm.num_batches_tracked, tracked)


def test_data_pass_keeps_counter_buffer() -> None:
    model = state_model()
    counter = model[3]
    assert isinstance(counter, CallCounter)
    calls = int(counter.calls)

    initrules.apply(model, load(STATE_POLICY), seed=0, data=batch(64, 16))

    assert int(counter.calls) == calls


def test_data_pass_keeps_training_flags() -> None:
    model = state_model()
    flags = {name: module.training for name, module in model.named_modules()}
    assert not all(flags.values()), "the model should mix train and eval modules"

    initrules.apply(model, load(STATE_POLICY), seed=0, data=batch(64, 16))

    after = {name: module.training for name, module in model.named_modules()}
    assert after == flags


def test_data_pass_keeps_global_rng() -> None:
    model = state_model()
    data = batch(64, 16)
    state = torch.get_rng_state()

    initrules.apply(model, load(STATE_POLICY), seed=0, data=data)

    assert torch.equal(torch.get_rng_state(), state)


class ReassignedCounter(nn.Module):
    """Count forward calls by assigning a new tensor to the buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls = self.calls + 1
        return self.linear(x)


def test_data_pass_keeps_reassigned_buffer() -> None:
    model = ReassignedCounter()
    policy = load(
        """\
        rules:
          - {match: {param: weight}, init: lsuv}
          - {match: {param: bias}, init: zeros}
        """
    )

    initrules.apply(model, policy, seed=0, data=batch(64, 8))

    assert int(model.calls) == 0


# Missing data.


def test_missing_data_raises_plan_error(tmp_path: Path) -> None:
    path = tmp_path / "lsuv.yaml"
    path.write_text(
        "rules:\n"
        "  - match: {param: bias}\n"
        "    init: zeros\n"
        "  - match: {param: weight}\n"
        "    init: {scheme: lsuv}\n"
    )
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
    before = snapshot(model)

    with pytest.raises(initrules.PlanError) as caught:
        initrules.apply(model, path, seed=0)

    message = str(caught.value)
    assert f"rule 2 at {path}:4:5" in message
    assert "'0.weight'" in message
    assert "pass apply(..., data=batch)" in message
    assert changed_tensors(model, before) == []


def test_unmatched_lsuv_rule_needs_no_data() -> None:
    policy = load(
        """\
        rules:
          - {match: {module: Conv2d, param: weight}, init: lsuv}
          - {match: {}, init: zeros}
        """
    )
    model = nn.Linear(4, 4)

    report = initrules.apply(model, policy, seed=0)

    assert report.lsuv == []


# Convergence.

FAR_OFF_POLICY = """\
checks: {on_failure: %s}
rules:
  - match: {param: weight}
    init: {scheme: lsuv, base: {scheme: orthogonal, gain: 3.0}, max_iter: %d}
  - match: {param: bias}
    init: zeros
"""


def far_off_layer() -> nn.Linear:
    torch.manual_seed(6)
    return nn.Linear(128, 128)


def test_one_pass_does_not_converge() -> None:
    policy = load(FAR_OFF_POLICY % ("raise", 1))

    with pytest.raises(initrules.CheckError) as caught:
        initrules.apply(far_off_layer(), policy, seed=0, data=batch(256, 128))

    report = caught.value.report
    result = report.lsuv[0]
    assert not result.converged
    assert result.iterations == 1
    assert result.output_std > 2.0
    assert [failure.check for failure in report.failures] == ["lsuv"]
    assert report.failures[0].tensor == "weight"


def test_non_convergence_warns() -> None:
    policy = load(FAR_OFF_POLICY % ("warn", 1))

    with pytest.warns(initrules.InitRulesWarning, match="lsuv: 'weight'"):
        report = initrules.apply(far_off_layer(), policy, seed=0, data=batch(256, 128))

    assert not report.ok
    assert [failure.check for failure in report.failures] == ["lsuv"]


def test_two_passes_converge() -> None:
    policy = load(FAR_OFF_POLICY % ("raise", 2))

    report = initrules.apply(far_off_layer(), policy, seed=0, data=batch(256, 128))

    assert report.lsuv[0].converged
    assert report.lsuv[0].iterations == 2


def test_disabled_checks_skip_lsuv() -> None:
    policy = load(
        """\
        checks: {enabled: false}
        rules:
          - match: {param: weight}
            init: {scheme: lsuv, base: {scheme: orthogonal, gain: 3.0}, max_iter: 1}
          - match: {param: bias}
            init: zeros
        """
    )

    report = initrules.apply(far_off_layer(), policy, seed=0, data=batch(256, 128))

    assert report.failures == []


def test_nan_output_message() -> None:
    policy = load(
        """\
        checks: {on_failure: warn}
        rules:
          - {match: {param: weight}, init: lsuv}
          - {match: {param: bias}, init: zeros}
        """
    )
    data = batch(64, 8)
    data[0, 0] = math.nan

    with pytest.warns(initrules.InitRulesWarning):
        report = initrules.apply(nn.Linear(8, 8), policy, seed=0, data=data)

    assert "produced no floating-point output" not in report.failures[0].message


# Unused module.


class SpareChild(nn.Module):
    """Two Linear children, of which the forward uses only ``used``."""

    def __init__(self) -> None:
        super().__init__()
        self.spare = nn.Linear(8, 8)
        self.used = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


def spare_report() -> Report:
    policy = load(
        """\
        checks: {on_failure: warn}
        rules:
          - {match: {param: weight}, init: lsuv}
          - {match: {param: bias}, init: zeros}
        """
    )
    with pytest.warns(initrules.InitRulesWarning, match="spare"):
        return initrules.apply(SpareChild(), policy, seed=0, data=batch(64, 8))


def spare_result(report: Report) -> LsuvResult:
    (result,) = [result for result in report.lsuv if result.module == "spare"]
    return result


def test_unused_module_not_run() -> None:
    result = spare_result(spare_report())
    assert result.iterations == 0
    assert not result.converged
    assert math.isnan(result.output_std)


def test_unused_module_fails_check() -> None:
    report = spare_report()
    failures = [failure for failure in report.failures if failure.check == "lsuv"]
    assert [failure.tensor for failure in failures] == ["spare.weight"]
    assert "produced no floating-point output" in failures[0].message


def test_unused_module_comes_last() -> None:
    report = spare_report()
    assert [result.module for result in report.lsuv] == ["used", "spare"]


def test_unused_module_raises_by_default() -> None:
    policy = load(
        """\
        rules:
          - {match: {param: weight}, init: lsuv}
          - {match: {param: bias}, init: zeros}
        """
    )
    with pytest.raises(initrules.CheckError, match=r"spare\.weight"):
        initrules.apply(SpareChild(), policy, seed=0, data=batch(64, 8))


# Inputs.


class TwoInputs(nn.Module):
    """Add a projection of ``x`` to a projection of ``y``."""

    def __init__(self) -> None:
        super().__init__()
        self.left = nn.Linear(8, 8)
        self.right = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.right(y) + self.left(x)


@pytest.mark.parametrize("form", ["tuple", "dict"])
def test_data_forms_reach_target(form: str) -> None:
    policy = load(LINEAR_LSUV % (1.0, 0.1))
    x, y = batch(64, 8, seed=7), batch(64, 8, seed=8) * 5
    data: Any = (x, y) if form == "tuple" else {"y": y, "x": x}
    model = TwoInputs()

    report = initrules.apply(model, policy, seed=0, data=data)

    assert [result.module for result in report.lsuv] == ["right", "left"]
    with torch.no_grad():
        assert abs(float(model.left(x).std()) - 1.0) <= 0.1
        assert abs(float(model.right(y).std()) - 1.0) <= 0.1


# Determinism.


def small_mlp(init_seed: int) -> nn.Sequential:
    torch.manual_seed(init_seed)
    return nn.Sequential(
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)
    )


def test_same_seed_bit_identical() -> None:
    first, second = small_mlp(10), small_mlp(11)
    assert not torch.equal(first[0].weight, second[0].weight), "fresh models agree"
    data = batch(128, 32)

    initrules.apply(first, load(LINEAR_LSUV % (1.0, 0.1)), seed=5, data=data)
    initrules.apply(second, load(LINEAR_LSUV % (1.0, 0.1)), seed=5, data=data)

    assert changed_tensors(second, snapshot(first)) == []


def test_other_seed_differs() -> None:
    first, second = small_mlp(10), small_mlp(10)
    data = batch(128, 32)

    initrules.apply(first, load(LINEAR_LSUV % (1.0, 0.1)), seed=5, data=data)
    initrules.apply(second, load(LINEAR_LSUV % (1.0, 0.1)), seed=6, data=data)

    weights = [f"{index}.weight" for index in (0, 2, 4)]
    assert changed_tensors(second, snapshot(first)) == weights


# Bad arguments.


@pytest.mark.parametrize(
    ("init", "fragments"),
    [
        pytest.param(
            "{scheme: lsuv, base: lsuv}",
            ["base scheme 'lsuv' cannot start an lsuv draw"],
            id="base-lsuv",
        ),
        pytest.param(
            "{scheme: lsuv, base: keep}",
            ["base scheme 'keep' cannot start an lsuv draw"],
            id="base-keep",
        ),
        pytest.param(
            "{scheme: lsuv, base: glorot}",
            ["unknown base scheme 'glorot'", "orthogonal"],
            id="base-unknown",
        ),
        pytest.param(
            "{scheme: lsuv, base: {std: 2.0}}",
            ["base needs a 'scheme' name"],
            id="base-no-scheme",
        ),
        pytest.param(
            "{scheme: lsuv, tol: 0}",
            ["'init.tol'", "greater than 0"],
            id="tol-zero",
        ),
        pytest.param(
            "{scheme: lsuv, max_iter: 0}",
            ["'init.max_iter'", "greater than or equal to 1"],
            id="max-iter-zero",
        ),
        pytest.param(
            "{scheme: lsuv, target_std: -1.0}",
            ["'init.target_std'", "greater than 0"],
            id="target-negative",
        ),
        pytest.param(
            "{scheme: lsuv, base: {scheme: normal, gain: 2}}",
            ["unknown key 'gain'"],
            id="base-extra-arg",
        ),
    ],
)
def test_bad_argument_rejected(init: str, fragments: list[str]) -> None:
    text = f"rules:\n  - {{match: {{param: weight}}, init: {init}}}\n"

    with pytest.raises(initrules.PolicyError) as caught:
        initrules.load_policy(text=text)

    for fragment in fragments:
        assert fragment in str(caught.value)


def test_base_extra_arg_names_base() -> None:
    text = (
        "rules:\n"
        "  - {match: {}, init: {scheme: lsuv, base: {scheme: normal, gain: 2}}}\n"
    )

    with pytest.raises(initrules.PolicyError) as caught:
        initrules.load_policy(text=text)

    assert "init.base" in str(caught.value)


def test_lsuv_on_bias_is_plan_error() -> None:
    policy = load(
        """\
        rules:
          - {match: {}, init: lsuv}
        """
    )
    model = nn.Linear(4, 3)
    before = snapshot(model)

    with pytest.raises(initrules.PlanError) as caught:
        initrules.apply(model, policy, seed=0, data=batch(8, 4))

    message = str(caught.value)
    assert "'bias'" in message
    assert "lsuv needs a tensor with at least 2 dimensions, got 1-D" in message
    assert changed_tensors(model, before) == []


class BareWeight(nn.Module):
    """A matrix product with no ``reset_parameters``."""

    def __init__(self) -> None:
        super().__init__()
        self.matrix = nn.Parameter(torch.ones(8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.matrix


def test_default_base_rejected() -> None:
    # `default` re-runs reset_parameters(), which the plan cannot check through
    # lsuv, so the policy itself rejects it as a base.
    text = (
        "rules:\n"
        "  - {match: {module: Linear}, init: zeros}\n"
        "  - {match: {param: matrix}, init: {scheme: lsuv, base: default}}\n"
    )

    with pytest.raises(initrules.PolicyError) as caught:
        initrules.load_policy(text=text)

    assert "base scheme 'default' cannot start an lsuv draw" in str(caught.value)


def test_saturated_output_stalls_and_restores_base() -> None:
    # A bias far larger than the weight's contribution sets the output std,
    # so rescaling the weight cannot reach the target.
    policy = load(
        """\
        checks: {on_failure: warn}
        rules:
          - match: {param: weight}
            init: {scheme: lsuv, base: {scheme: normal, std: 0.1}}
          - {match: {param: bias}, init: {scheme: normal, std: 10.0}}
        """
    )
    model = nn.Linear(32, 32)
    with pytest.warns(initrules.InitRulesWarning):
        report = initrules.apply(model, policy, seed=0, data=batch(64, 32))
    result = report.lsuv[0]
    assert result.converged is False
    assert result.reason == "stalled"
    assert "however the weight is scaled" in report.failures[0].message
    assert "the root module" in report.failures[0].message
    # The weight keeps its base draw, std 0.1, not a rescaled extreme.
    assert math.isclose(float(model.weight.detach().std()), 0.1, rel_tol=0.2)
