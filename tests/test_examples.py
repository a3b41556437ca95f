"""Run the scripts in examples/ and check both their output and their policies.

Each script runs once in a subprocess, the way a user runs it, and its printed
report is parsed back into cells. Each example's model is also initialized here
through ``initrules.apply`` directly, so a policy that stops giving a tensor its
intended scheme fails with the tensor's name in the message.
"""

import importlib.util
import math
import re
import subprocess
import sys
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import initrules

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES_DIR = REPO_ROOT / "examples"
SCRIPTS = ["nested_model", "name_targeted", "absurd_init"]
TIMEOUT_S = 120

# Columns of the table that Report.__str__ prints, which pads cells with spaces
# and separates them with at least two.
TABLE_COLUMNS = ("tensor", "shape", "module", "rule", "scheme", "mean", "std")


@cache
def run_script(name: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLES_DIR / f"{name}.py")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


def script_output(name: str) -> str:
    result = run_script(name)
    assert result.returncode == 0, (
        f"examples/{name}.py exited with {result.returncode}:\n{result.stderr}"
    )
    return result.stdout


def table_cells(output: str, tensor: str) -> dict[str, str]:
    """Return the printed report's cells for one tensor, keyed by column header."""
    lines = output.splitlines()
    header_index = next(
        (i for i, line in enumerate(lines) if line.split()[:2] == ["tensor", "shape"]),
        None,
    )
    assert header_index is not None, f"no report table in the output:\n{output}"
    header = re.split(r"\s{2,}", lines[header_index].strip())
    assert tuple(header[: len(TABLE_COLUMNS)]) == TABLE_COLUMNS, header
    for line in lines[header_index + 1 :]:
        cells = re.split(r"\s{2,}", line.strip())
        if cells[0] == tensor:
            return dict(zip(header, cells, strict=True))
    raise AssertionError(f"no table row for {tensor!r} in the output:\n{output}")


@cache
def load_example(name: str) -> ModuleType:
    path = EXAMPLES_DIR / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"initrules_example_{name}", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def plan_example(name: str) -> initrules.Report:
    """Return the report of each tensor's winning rule, writing nothing.

    ``initrules.check`` resolves the same rules as ``apply`` but never raises for
    failed checks, so it also covers the policy that ``apply`` rejects.
    """
    example = load_example(name)
    return initrules.check(example.build_model(), example.POLICY)


def apply_example(name: str) -> initrules.Report:
    example = load_example(name)
    return initrules.apply(example.build_model(), example.POLICY, seed=0)


# --- every script ----------------------------------------------------------


@pytest.mark.parametrize("name", SCRIPTS, ids=SCRIPTS)
def test_script_exits_cleanly(name: str) -> None:
    output = script_output(name)
    assert output.startswith("initrules: policy "), output
    assert " 0 unmatched," in output, output


@pytest.mark.parametrize("name", SCRIPTS, ids=SCRIPTS)
def test_policy_matches_every_parameter(name: str) -> None:
    report = plan_example(name)
    assert report.unmatched == []
    assert report.skipped == []
    assert report.summary["kept"] == 0


# --- printed reports ---------------------------------------------------------

PRINTED_SCHEMES = [
    (
        "nested_model",
        "conv.weight",
        "kaiming_normal(a=0.0, mode=fan_out, nonlinearity=relu, fans=torch)",
    ),
    ("nested_model", "conv.bias", "zeros"),
    ("nested_model", "head.0.weight", "xavier_normal(gain=1.0, fans=torch)"),
    ("nested_model", "head.2.weight", "normal(mean=0.0, std=0.01)"),
    ("name_targeted", "embed.weight", "normal(mean=0.0, std=0.02)"),
    ("name_targeted", "proj_in.weight", "xavier_uniform(gain=1.0, fans=torch)"),
    ("name_targeted", "gate.bias", "zeros"),
    ("name_targeted", "norm.weight", "ones"),
]


@pytest.mark.parametrize(
    ("name", "tensor", "scheme"),
    PRINTED_SCHEMES,
    ids=[f"{name}-{tensor}" for name, tensor, _ in PRINTED_SCHEMES],
)
def test_printed_scheme(name: str, tensor: str, scheme: str) -> None:
    cells = table_cells(script_output(name), tensor)
    assert cells["scheme"] == scheme


PRINTED_RULES = [
    ("nested_model", "head.0.weight", "first head linear"),
    ("nested_model", "head.2.weight", "second head linear"),
    ("name_targeted", "proj_out.weight", "projection weights"),
    ("name_targeted", "proj_out.bias", "gate and projection biases"),
    ("name_targeted", "norm.bias", "everything else"),
]


@pytest.mark.parametrize(
    ("name", "tensor", "rule"),
    PRINTED_RULES,
    ids=[f"{name}-{tensor}" for name, tensor, _ in PRINTED_RULES],
)
def test_printed_rule_name(name: str, tensor: str, rule: str) -> None:
    cells = table_cells(script_output(name), tensor)
    assert re.fullmatch(rf"{re.escape(rule)} \(line \d+\)", cells["rule"]), cells


def test_name_targeted_prints_row_and_captures() -> None:
    output = script_output("name_targeted")
    assert "report.row('proj_in.weight'):" in output
    assert "  scheme:   xavier_uniform(gain=1.0, fans=torch)" in output
    assert "proj_in.weight: captured {'side': 'in'}" in output
    assert "proj_out.weight: captured {'side': 'out'}" in output


def test_absurd_init_prints_scale_failures() -> None:
    output = script_output("absurd_init")
    failures = [line.strip() for line in output.splitlines() if "scale: " in line]
    assert len(failures) == 2, output
    for line, tensor in zip(failures, ("0.weight", "2.weight"), strict=True):
        assert line.startswith(f"scale: {tensor!r}"), line
        assert "mean 100 (the arguments imply) exceeds the std 0.1" in line


def test_absurd_init_leaves_weights_unchanged() -> None:
    output = script_output("absurd_init")
    assert output.splitlines()[-1] == "weights unchanged: True"


# --- policies through initrules.apply ---------------------------------------

EXPECTED_SCHEMES: list[tuple[str, str, str, dict[str, Any]]] = [
    (
        "nested_model",
        "conv.weight",
        "kaiming_normal",
        {"mode": "fan_out", "nonlinearity": "relu"},
    ),
    ("nested_model", "conv.bias", "zeros", {}),
    ("nested_model", "head.0.weight", "xavier_normal", {}),
    ("nested_model", "head.0.bias", "zeros", {}),
    ("nested_model", "head.2.weight", "normal", {"mean": 0.0, "std": 0.01}),
    ("nested_model", "head.2.bias", "zeros", {}),
    ("name_targeted", "embed.weight", "normal", {"mean": 0.0, "std": 0.02}),
    ("name_targeted", "proj_in.weight", "xavier_uniform", {}),
    ("name_targeted", "proj_in.bias", "zeros", {}),
    ("name_targeted", "gate.weight", "orthogonal", {}),
    ("name_targeted", "gate.bias", "zeros", {}),
    ("name_targeted", "proj_out.weight", "xavier_uniform", {}),
    ("name_targeted", "proj_out.bias", "zeros", {}),
    ("name_targeted", "norm.weight", "ones", {}),
    ("name_targeted", "norm.bias", "zeros", {}),
    ("absurd_init", "0.weight", "normal", {"mean": 100.0, "std": 0.1}),
    ("absurd_init", "0.bias", "zeros", {}),
    ("absurd_init", "2.weight", "normal", {"mean": 100.0, "std": 0.1}),
    ("absurd_init", "2.bias", "zeros", {}),
]


@pytest.mark.parametrize(
    ("name", "tensor", "scheme", "args"),
    EXPECTED_SCHEMES,
    ids=[f"{name}-{tensor}" for name, tensor, _, _ in EXPECTED_SCHEMES],
)
def test_policy_scheme(
    name: str, tensor: str, scheme: str, args: dict[str, Any]
) -> None:
    row = plan_example(name).row(tensor)
    assert row.scheme == scheme, (
        f"{tensor} got {row.scheme} from rule {row.rule_index + 1} "
        f"({row.rule_name!r}) of examples/{name}.yaml, expected {scheme}"
    )
    for key, value in args.items():
        assert row.args[key] == value, (
            f"{tensor}: {key}={row.args[key]!r}, expected {value!r}"
        )


@pytest.mark.parametrize("name", SCRIPTS, ids=SCRIPTS)
def test_every_tensor_expected(name: str) -> None:
    """The tables above list every parameter of each example model."""
    listed = {tensor for example, tensor, _, _ in EXPECTED_SCHEMES if example == name}
    assert {row.name for row in plan_example(name).rows} == listed


def test_nested_conv_std_uses_fan_out() -> None:
    # kaiming_normal with a ReLU gain has std sqrt(2 / fan). For the 8x3x3x3 conv
    # weight, fan_out = 8 * 9 = 72 (std 0.167) and fan_in = 3 * 9 = 27 (std 0.272).
    # The 216 drawn values estimate the std to about 5%, so a 20% margin separates them.
    row = apply_example("nested_model").row("conv.weight")
    assert row.std is not None
    assert math.isclose(row.std, math.sqrt(2 / 72), rel_tol=0.2), row.std


def test_name_targeted_regex_captures() -> None:
    example = load_example("name_targeted")
    plan = initrules.make_plan(
        example.build_model(), initrules.load_policy(example.POLICY)
    )
    captures = {
        item.entry.name: dict(item.match.captures)
        for item in plan.planned
        if item.match.captures
    }
    assert captures == {
        "proj_in.weight": {"side": "in"},
        "proj_out.weight": {"side": "out"},
    }


@pytest.mark.parametrize("name", ["nested_model", "name_targeted"])
def test_sound_example_passes_checks(name: str) -> None:
    assert apply_example(name).failures == []


def test_absurd_init_rejected_before_writing() -> None:
    example = load_example("absurd_init")
    with pytest.raises(initrules.CheckError) as raised:
        initrules.apply(example.build_model(), example.POLICY, seed=0)
    report = raised.value.report
    assert [failure.tensor for failure in report.failures] == ["0.weight", "2.weight"]
    assert {failure.check for failure in report.failures} == {"scale"}
    assert report.rows == []
