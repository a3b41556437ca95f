import re
from pathlib import Path

import torch
from torch import nn

import initrules

README = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")


def test_readme_policy_loads_and_applies() -> None:
    block = re.search(r"## A policy\n\n```yaml\n(.*?)```", README, re.DOTALL)
    assert block is not None, "README.md lost its policy example"
    policy = initrules.load_policy(text=block.group(1))
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.LayerNorm(8))
    report = initrules.apply(model, policy, seed=0)
    assert report.unmatched == []
    assert report.row("0.weight").scheme == "kaiming_normal"
    assert report.row("1.weight").scheme == "ones"
    assert torch.count_nonzero(model[0].bias) == 0


def test_readme_commands_are_marked() -> None:
    for marker in ("<!-- setup-command -->", "<!-- test-command -->"):
        assert f"{marker}\n```bash\n" in README, f"README.md lacks {marker}"


def test_readme_checks_example_loads() -> None:
    block = re.search(r"## Checks after init\n.*?```yaml\n(.*?)```", README, re.DOTALL)
    assert block is not None, "README.md lost its checks example"
    policy = initrules.load_policy(text=block.group(1))
    assert policy.checks.tolerance == 6.0
    assert policy.rules[0].expect is not None
    assert policy.rules[1].checks.statistics is False
