"""Partial initialization: only some tensors, or only those a checkpoint lacks."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

import initrules

POLICY = Path(__file__).parents[1] / "policies" / "gpt2.yaml"


def gpt2() -> GPT2LMHeadModel:
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=100, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config)


def test_skip_loaded_keeps_tied_head() -> None:
    source = gpt2()
    state = {k: v for k, v in source.state_dict().items() if k != "lm_head.weight"}
    model = gpt2()
    result = model.load_state_dict(state, strict=False)
    assert "lm_head.weight" in result.missing_keys
    report = initrules.apply(model, POLICY, seed=0, skip_loaded=result)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert torch.equal(model.lm_head.weight, source.transformer.wte.weight)
    assert report.rows == []
    reasons = {skipped.name: skipped.reason for skipped in report.skipped}
    assert reasons["transformer.wte.weight"] == "loaded from the checkpoint"


def test_partial_checkpoint_loaded_tensors_identical() -> None:
    source = gpt2()
    state = {k: v for k, v in source.state_dict().items() if ".h.1." not in k}
    model = gpt2()
    result = model.load_state_dict(state, strict=False)
    initrules.apply(model, POLICY, seed=0, skip_loaded=result)
    after = model.state_dict()
    for name, value in state.items():
        assert torch.equal(after[name], value), name
    # The missing layer was drawn again, so its random weights differ.
    for name in (
        "transformer.h.1.attn.c_attn.weight",
        "transformer.h.1.mlp.c_fc.weight",
    ):
        assert name in result.missing_keys
        assert not torch.equal(after[name], source.state_dict()[name]), name


def test_only_initializes_named_tensors() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    policy = initrules.load_policy(text="rules:\n  - {match: {}, init: zeros}\n")
    report = initrules.apply(model, policy, seed=0, only=["1.weight"])
    assert torch.count_nonzero(model[1].weight) == 0
    for name in ("0.weight", "0.bias", "1.bias"):
        assert torch.equal(model.state_dict()[name], before[name]), name
    assert [row.name for row in report.rows] == ["1.weight"]


def test_loaded_unmatched_tensor_is_not_an_error() -> None:
    # A parameter that no rule matches is fine when the checkpoint has it.
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    state = {k: v for k, v in model.state_dict().items() if k.startswith("1.")}
    result = model.load_state_dict(state, strict=False)
    policy = initrules.load_policy(
        text="rules:\n  - {match: {module: Linear}, init: zeros}\n"
    )
    report = initrules.apply(model, policy, seed=0, skip_loaded=result)
    assert report.unmatched == []
    assert [row.name for row in report.rows] == ["0.weight", "0.bias"]


def test_skip_loaded_needs_missing_keys() -> None:
    with pytest.raises(TypeError, match="missing_keys"):
        initrules.apply(nn.Linear(2, 2), POLICY, skip_loaded={"a": 1})


ZEROS = "rules:\n  - match: {}\n    init: zeros\n"


def test_only_rejects_a_bare_string() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(TypeError, match="only must be a collection of names"):
        initrules.apply(model, initrules.load_policy(text=ZEROS), only="0.weight")


def test_only_rejects_unknown_names() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(initrules.PlanError) as caught:
        initrules.apply(model, initrules.load_policy(text=ZEROS), only=["0.wieght"])
    assert str(caught.value) == (
        "only names 1 tensor(s) the model does not have: '0.wieght' (close: "
        "0.weight); use canonical names as the report shows them"
    )
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name])


def test_tensors_left_out_do_not_stop_the_plan() -> None:
    # xavier cannot fill a 1-D bias, but only the weight is asked for.
    model = nn.Sequential(nn.Linear(4, 4))
    policy = initrules.load_policy(
        text="rules:\n  - match: {}\n    init: xavier_uniform\n"
    )
    report = initrules.apply(model, policy, seed=0, only=["0.weight"])
    assert [row.name for row in report.rows] == ["0.weight"]


class WithCache(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.register_buffer("cache", torch.ones(4), persistent=False)


def test_non_persistent_buffer_is_never_counted_as_loaded() -> None:
    model = WithCache()
    result = model.load_state_dict(WithCache().state_dict(), strict=False)
    text = (
        "rules:\n  - match: {kind: buffer, param: cache}\n    init: zeros\n"
        "  - match: {}\n    init: zeros\n"
    )
    report = initrules.apply(
        model, initrules.load_policy(text=text), skip_loaded=result
    )
    assert [row.name for row in report.rows] == ["cache"]
    assert torch.equal(model.cache, torch.zeros(4))
