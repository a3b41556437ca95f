"""Custom schemes: registered in code with the decorator, or by an entry point."""

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import initrules
from initrules import schemes


class ScaledArgs(initrules.SchemeArgs):
    """Arguments of the test scheme: every value set to ``scale``."""

    scale: float = 1.0


@pytest.fixture
def scaled_ones() -> Iterator[str]:
    name = "test_scaled_ones"

    @initrules.register_scheme(name, args=ScaledArgs, random=False)
    def fill(tensor: torch.Tensor, args: ScaledArgs, context: object) -> None:
        tensor.fill_(args.scale)

    yield name
    schemes._REGISTRY.pop(name, None)


def test_decorated_scheme_applies(scaled_ones: str) -> None:
    init = f"{{scheme: {scaled_ones}, scale: 0.5}}"
    policy = initrules.load_policy(text=f"rules:\n  - {{match: {{}}, init: {init}}}\n")
    model = nn.Linear(3, 2)
    report = initrules.apply(model, policy, seed=0)
    assert torch.equal(model.weight, torch.full((2, 3), 0.5))
    assert report.row("weight").args == {"scale": 0.5}


def test_decorated_scheme_validates_arguments(scaled_ones: str) -> None:
    text = f"rules:\n  - {{match: {{}}, init: {{scheme: {scaled_ones}, scael: 2}}}}\n"
    with pytest.raises(initrules.PolicyError) as caught:
        initrules.load_policy(text=text)
    assert "unknown key 'scael'" in str(caught.value)


def test_decorated_scheme_in_json_schema(scaled_ones: str) -> None:
    choices = initrules.policy_json_schema()["$defs"]["InitSpec"]["oneOf"]
    titles = [choice.get("title") for choice in choices]
    assert scaled_ones in titles


def test_existing_name_needs_override(scaled_ones: str) -> None:
    with pytest.raises(ValueError, match="already registered; pass override=True"):
        initrules.register_scheme(scaled_ones, args=ScaledArgs)


def test_override_replaces_scheme(scaled_ones: str) -> None:
    @initrules.register_scheme(
        scaled_ones, args=ScaledArgs, random=False, override=True
    )
    def fill_twice(tensor: torch.Tensor, args: ScaledArgs, context: object) -> None:
        tensor.fill_(2 * args.scale)

    policy = initrules.load_policy(
        text=f"rules:\n  - {{match: {{}}, init: {scaled_ones}}}\n"
    )
    model = nn.Linear(3, 2)
    initrules.apply(model, policy, seed=0)
    assert torch.equal(model.bias, torch.full((2,), 2.0))


PLUGIN = """
import initrules


class HalfArgs(initrules.SchemeArgs):
    factor: float = 0.5


@initrules.register_scheme("demo_half", args=HalfArgs, random=False)
def fill(tensor, args, context):
    tensor.fill_(args.factor)
"""

SCRIPT = """
import json, sys, torch, initrules
policy = initrules.load_policy(text=sys.argv[1])
model = torch.nn.Linear(3, 2)
initrules.apply(model, policy, seed=0)
print(json.dumps(model.bias.tolist()))
"""


def install_plugin(root: Path) -> None:
    """Lay out an installed distribution whose entry point names the plugin."""
    package = root / "demo_schemes"
    package.mkdir()
    (package / "__init__.py").write_text(textwrap.dedent(PLUGIN))
    info = root / "demo_schemes-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: demo-schemes\nVersion: 0.1\n"
    )
    (info / "entry_points.txt").write_text("[initrules.schemes]\ndemo = demo_schemes\n")


def run_with_plugin(root: Path, policy: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, policy],
        capture_output=True,
        text=True,
        timeout=120,
        env=environment,
        check=False,
    )


def test_entry_point_scheme_applies(tmp_path: Path) -> None:
    install_plugin(tmp_path)
    result = run_with_plugin(
        tmp_path, "rules:\n  - {match: {}, init: {scheme: demo_half, factor: 0.25}}\n"
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [0.25, 0.25]


def test_entry_point_scheme_validates(tmp_path: Path) -> None:
    install_plugin(tmp_path)
    result = run_with_plugin(
        tmp_path, "rules:\n  - {match: {}, init: {scheme: demo_half, factor: big}}\n"
    )
    assert result.returncode == 1
    assert "unknown name 'big'" in result.stderr


def test_registration_checks_name_and_arguments() -> None:
    def fill(tensor: torch.Tensor, args: object, context: object) -> None:
        tensor.zero_()

    with pytest.raises(ValueError, match="invalid scheme name ''"):
        initrules.register_scheme("", random=False)(fill)
    with pytest.raises(TypeError, match=r"must be a subclass of initrules\.SchemeArgs"):
        initrules.register_scheme("not_args", args=dict, random=False)  # type: ignore[arg-type]
    assert "not_args" not in initrules.scheme_names()
