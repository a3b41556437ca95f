"""Policies that extend other policy files."""

from pathlib import Path

import pytest
import torch
from torch import nn

import initrules

BASE = """\
name: base
on_unmatched: warn
vars: {width: 1, depth: 2}
rules:
  - name: base weights
    match: {param: weight}
    init: {scheme: normal, std: 0.02}
  - name: base biases
    match: {param: bias}
    init: zeros
"""


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_extending_rules_win(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", BASE)
    child = write(
        tmp_path,
        "child.yaml",
        "extends: base.yaml\nrules:\n  - {match: {param: bias}, init: ones}\n",
    )
    model = nn.Linear(4, 3)
    report = initrules.apply(model, child, seed=0)
    assert torch.equal(model.bias, torch.ones(3))
    assert report.row("weight").rule_name == "base weights"
    assert report.row("bias").rule_location == f"{child}:3:5"


def test_report_names_the_file_of_a_base_rule(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", BASE)
    child = write(
        tmp_path,
        "child.yaml",
        "extends: base.yaml\n"
        "rules:\n"
        "  - {name: own, match: {param: bias}, init: ones}\n",
    )
    markdown = initrules.apply(nn.Linear(4, 3), child, seed=0).to_markdown()
    assert "| base weights (base.yaml:5) |" in markdown
    assert "| own (line 3) |" in markdown


def test_base_rule_keeps_its_file(tmp_path: Path) -> None:
    base = write(tmp_path, "base.yaml", BASE)
    child = write(tmp_path, "child.yaml", "extends: base.yaml\nrules: []\n")
    policy = initrules.load_policy(child)
    assert [str(rule.location) for rule in policy.rules] == [
        f"{base}:5:5",
        f"{base}:8:5",
    ]


def test_options_and_vars_merge(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", BASE)
    child = write(
        tmp_path,
        "child.yaml",
        "extends: [base.yaml]\nvars: {width: 4}\nrules: []\n",
    )
    policy = initrules.load_policy(child)
    assert policy.vars == {"width": 4.0, "depth": 2.0}
    assert policy.on_unmatched == "warn"
    assert policy.name == "base"


def test_own_option_wins(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", BASE)
    child = write(
        tmp_path, "child.yaml", "extends: base.yaml\non_unmatched: error\nrules: []\n"
    )
    assert initrules.load_policy(child).on_unmatched == "error"


def test_relative_to_extending_file(tmp_path: Path) -> None:
    write(tmp_path, "shared/base.yaml", BASE)
    child = write(tmp_path, "models/child.yaml", "extends: ../shared/base.yaml\n")
    assert len(initrules.load_policy(child).rules) == 2


def test_cycle_lists_chain(tmp_path: Path) -> None:
    first = write(tmp_path, "first.yaml", "extends: second.yaml\nrules: []\n")
    second = write(tmp_path, "second.yaml", "extends: [first.yaml]\nrules: []\n")
    with pytest.raises(initrules.PolicyError) as caught:
        initrules.load_policy(first)
    assert str(caught.value) == (
        f"{second}:1:11: 'extends' makes a cycle: {first} -> {second} -> {first}"
    )


def test_self_extension_is_cycle(tmp_path: Path) -> None:
    path = write(tmp_path, "self.yaml", "extends: self.yaml\nrules: []\n")
    with pytest.raises(initrules.PolicyError, match="makes a cycle"):
        initrules.load_policy(path)


def test_error_in_base_names_base_line(tmp_path: Path) -> None:
    base = write(
        tmp_path,
        "base.yaml",
        "rules:\n  - match: {param: weight}\n    init: {scheme: normal, sdt: 1}\n",
    )
    child = write(tmp_path, "child.yaml", "extends: base.yaml\nrules: []\n")
    with pytest.raises(initrules.PolicyError) as caught:
        initrules.load_policy(child)
    assert caught.value.path == str(base)
    assert caught.value.line == 3


def test_missing_base_is_positioned(tmp_path: Path) -> None:
    child = write(tmp_path, "child.yaml", "rules: []\nextends: nowhere.yaml\n")
    with pytest.raises(initrules.PolicyError) as caught:
        initrules.load_policy(child)
    assert str(caught.value).startswith(f"{child}:2:10: 'extends' names 'nowhere.yaml'")


def test_rules_required_without_extends() -> None:
    with pytest.raises(initrules.PolicyError) as caught:
        initrules.load_policy(text="name: lonely\n")
    assert str(caught.value) == "<text>:1:1: missing required key 'rules' in the policy"


def test_shared_base_gives_its_rules_once(tmp_path: Path) -> None:
    shared = write(tmp_path, "shared.yaml", BASE)
    write(tmp_path, "left.yaml", "extends: shared.yaml\n")
    write(tmp_path, "right.yaml", "extends: shared.yaml\n")
    top = write(tmp_path, "top.yaml", "extends: [left.yaml, right.yaml]\n")
    policy = initrules.load_policy(top)
    assert [str(rule.location) for rule in policy.rules] == [
        f"{shared}:5:5",
        f"{shared}:8:5",
    ]
