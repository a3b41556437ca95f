"""The pretrained scheme: tensors copied from checkpoint files on disk."""

import os
from pathlib import Path

import pytest
import torch
from torch import nn

import initrules
from initrules.lint import lint_policy


def source_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def write_policy(directory: Path, text: str, name: str = "policy.yaml") -> Path:
    path = directory / name
    path.write_text(text)
    return path


ENCODER_POLICY = """
rules:
  - name: encoder
    match: {name: "0.*"}
    init: {scheme: pretrained, path: encoder.pt, prefix: {"0.": "backbone."}}
  - match: {param: weight}
    init: xavier_uniform
  - match: {param: bias}
    init: zeros
"""


@pytest.fixture
def encoder_checkpoint(tmp_path: Path) -> nn.Sequential:
    source = source_model()
    state = {f"backbone.{k}": v for k, v in source[0].state_dict().items()}
    torch.save(state, tmp_path / "encoder.pt")
    return source


def test_copies_mapped_keys_bit_for_bit(
    tmp_path: Path, encoder_checkpoint: nn.Sequential
) -> None:
    policy = write_policy(tmp_path, ENCODER_POLICY)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    report = initrules.apply(model, policy, seed=0)

    assert torch.equal(model[0].weight, encoder_checkpoint[0].weight)
    assert torch.equal(model[0].bias, encoder_checkpoint[0].bias)
    assert not torch.equal(model[1].weight, encoder_checkpoint[1].weight)
    assert report.row("0.weight").args["key"] == "backbone.weight"
    assert report.row("0.bias").args["key"] == "backbone.bias"
    assert report.ok


def test_path_is_relative_to_the_policy_file(
    tmp_path: Path, encoder_checkpoint: nn.Sequential, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy = write_policy(tmp_path, ENCODER_POLICY)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    initrules.apply(model, policy, seed=0)
    assert torch.equal(model[0].weight, encoder_checkpoint[0].weight)


def test_base_file_path_is_relative(
    tmp_path: Path, encoder_checkpoint: nn.Sequential
) -> None:
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    os.replace(tmp_path / "encoder.pt", base_dir / "encoder.pt")
    write_policy(base_dir, ENCODER_POLICY, "base.yaml")
    child = write_policy(tmp_path, "extends: base/base.yaml\n")
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    initrules.apply(model, child, seed=0)
    assert torch.equal(model[0].weight, encoder_checkpoint[0].weight)


def test_wrong_shape_is_plan_error_naming_both_shapes(
    tmp_path: Path, encoder_checkpoint: nn.Sequential
) -> None:
    policy = write_policy(tmp_path, ENCODER_POLICY)
    model = nn.Sequential(nn.Linear(5, 3), nn.Linear(3, 2))
    before = snapshot(model)
    with pytest.raises(initrules.PlanError) as caught:
        initrules.apply(model, policy, seed=0)
    checkpoint = tmp_path / "encoder.pt"
    assert str(caught.value) == (
        f"rule 1 'encoder' at {policy}:3:5 cannot initialize '0.weight' (shape "
        f"(3, 5), float32): the checkpoint tensor 'backbone.weight' in {checkpoint} "
        "has shape (3, 4), and the model's tensor has shape (3, 5); fix the rule's "
        "path, prefix or key"
    )
    assert_unchanged(model, before)


def test_missing_key_names_close_keys(
    tmp_path: Path, encoder_checkpoint: nn.Sequential
) -> None:
    text = ENCODER_POLICY.replace('"backbone."', '"backbone.0."')
    policy = write_policy(tmp_path, text)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    before = snapshot(model)
    with pytest.raises(initrules.PlanError) as caught:
        initrules.apply(model, policy, seed=0)
    message = str(caught.value)
    assert message.startswith("2 tensors cannot be initialized:\n")
    assert (
        f"{tmp_path / 'encoder.pt'} has no tensor 'backbone.0.weight' (2 keys); close "
        "keys: backbone.weight" in message
    )
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (None, "does not exist"),
        ([1, 2, 3], "does not hold a state dict"),
        (b"not a checkpoint", "cannot read the checkpoint"),
    ],
    ids=["missing", "a-list", "garbage"],
)
def test_unreadable_checkpoint_is_plan_error(
    tmp_path: Path, content: object, reason: str
) -> None:
    path = tmp_path / "encoder.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    policy = write_policy(tmp_path, ENCODER_POLICY)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    before = snapshot(model)
    with pytest.raises(initrules.PlanError, match=reason):
        initrules.apply(model, policy, seed=0)
    assert_unchanged(model, before)


class Payload:
    """An object that only a full unpickler could rebuild."""


def test_arbitrary_pickles_are_refused(tmp_path: Path) -> None:
    # weights_only=True: a checkpoint cannot run code or build objects.
    torch.save({"backbone.weight": Payload()}, tmp_path / "encoder.pt")
    policy = write_policy(tmp_path, ENCODER_POLICY)
    with pytest.raises(initrules.PlanError, match="cannot read the checkpoint"):
        initrules.apply(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)), policy)


def test_safetensors_file_with_explicit_key(tmp_path: Path) -> None:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    source = source_model()
    safetensors_torch.save_file(
        {"head": source[1].weight.detach().contiguous()}, tmp_path / "head.safetensors"
    )
    text = """
rules:
  - match: {name: "1.weight"}
    init: {scheme: pretrained, path: head.safetensors, key: head}
  - match: {param: weight}
    init: xavier_uniform
  - match: {param: bias}
    init: zeros
"""
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    report = initrules.apply(model, write_policy(tmp_path, text), seed=0)
    assert torch.equal(model[1].weight, source[1].weight)
    assert report.row("1.weight").args["key"] == "head"


def test_checkpoint_dtype_is_cast(tmp_path: Path) -> None:
    source = source_model()
    state = {
        f"backbone.{k}": v.to(torch.bfloat16) for k, v in source[0].state_dict().items()
    }
    torch.save(state, tmp_path / "encoder.pt")
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    initrules.apply(model, write_policy(tmp_path, ENCODER_POLICY), seed=0)
    assert model[0].weight.dtype == torch.float32
    assert torch.equal(model[0].weight, source[0].weight.to(torch.bfloat16).float())


def test_pretrained_cannot_fill_a_chunk(
    tmp_path: Path, encoder_checkpoint: nn.Sequential
) -> None:
    text = """
rules:
  - match: {name: "0.weight"}
    init: {scheme: pretrained, path: encoder.pt, key: backbone.weight, chunks: 3}
  - match: {}
    init: zeros
"""
    with pytest.raises(initrules.PlanError, match="pretrained copies whole tensors"):
        initrules.apply(
            nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)),
            write_policy(tmp_path, text),
        )


def test_lint_reports_a_wrong_shape(
    tmp_path: Path, encoder_checkpoint: nn.Sequential
) -> None:
    policy = write_policy(tmp_path, ENCODER_POLICY)
    model = nn.Sequential(nn.Linear(5, 3), nn.Linear(3, 2))
    findings = lint_policy(initrules.load_policy(policy), model=model)
    assert [finding.code for finding in findings] == ["IR204"]
    assert "has shape (3, 4), and the model's tensor has shape (3, 5)" in str(
        findings[0]
    )


def test_integer_checkpoint_into_float_tensor_is_plan_error(tmp_path: Path) -> None:
    torch.save(
        {
            "backbone.weight": torch.ones(3, 4, dtype=torch.int64),
            "backbone.bias": torch.zeros(3),
        },
        tmp_path / "encoder.pt",
    )
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    before = snapshot(model)
    with pytest.raises(initrules.PlanError, match="is int64, which does not cast to"):
        initrules.apply(model, write_policy(tmp_path, ENCODER_POLICY), seed=0)
    assert_unchanged(model, before)


def test_value_beyond_float16_is_plan_error(tmp_path: Path) -> None:
    torch.save(
        {
            "backbone.weight": torch.full((3, 4), 1.0e6),
            "backbone.bias": torch.zeros(3),
        },
        tmp_path / "encoder.pt",
    )
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)).half()
    before = snapshot(model)
    with pytest.raises(initrules.PlanError, match="beyond the largest float16 value"):
        initrules.apply(model, write_policy(tmp_path, ENCODER_POLICY), seed=0)
    assert_unchanged(model, before)


def test_explicit_key_read_twice(
    tmp_path: Path, encoder_checkpoint: nn.Sequential
) -> None:
    text = """
rules:
  - match: {param: weight}
    init: {scheme: pretrained, path: encoder.pt, key: backbone.weight}
  - match: {param: bias}
    init: zeros
"""
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(4, 3))
    with pytest.raises(
        initrules.PlanError, match=r"it wins both '0\.weight' and '1\.weight'"
    ):
        initrules.apply(model, write_policy(tmp_path, text), seed=0)


def test_directory_path_is_named_as_such(tmp_path: Path) -> None:
    (tmp_path / "encoder.pt").mkdir()
    with pytest.raises(initrules.PlanError, match="is a directory, not a file"):
        initrules.apply(
            nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)),
            write_policy(tmp_path, ENCODER_POLICY),
        )
