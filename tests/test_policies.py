"""Check that the shipped policies reproduce transformers' own weight initialization.

Each test builds a small model twice: once initialized by transformers, once with every
parameter overwritten with NaN and then initialized by `initrules.apply`. The two are
compared tensor by tensor with `compare_to_reference`.
"""

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from _stats import compare_to_reference
from torch import nn
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

import initrules

POLICY_DIR = Path(__file__).parents[1] / "policies"

# The largest tensors are the token embeddings, VOCAB_SIZE x HIDDEN_SIZE = 64,000
# elements. At that size the std tolerance (5 standard errors) is about 2% of the std,
# so a 5% std error exceeds the tolerance by about 7.6 standard errors.
VOCAB_SIZE = 1000
HIDDEN_SIZE = 64
MAX_POSITIONS = 128


def build_gpt2() -> nn.Module:
    # n_layer stays at the default 12 because gpt2.yaml hard-codes c_proj's std for it.
    config = GPT2Config(
        n_layer=12,
        n_embd=HIDDEN_SIZE,
        n_head=4,
        vocab_size=VOCAB_SIZE,
        n_positions=MAX_POSITIONS,
        bos_token_id=VOCAB_SIZE - 1,
        eos_token_id=VOCAB_SIZE - 1,
    )
    return GPT2LMHeadModel(config)


def build_bert() -> nn.Module:
    # pad_token_id keeps its default of 0, so row 0 of word_embeddings is zeroed.
    config = BertConfig(
        hidden_size=HIDDEN_SIZE,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=4 * HIDDEN_SIZE,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=MAX_POSITIONS,
    )
    return BertModel(config, add_pooling_layer=True)


def build_llama() -> nn.Module:
    config = LlamaConfig(
        hidden_size=HIDDEN_SIZE,
        intermediate_size=4 * HIDDEN_SIZE,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=MAX_POSITIONS,
    )
    return LlamaForCausalLM(config)


@dataclass(frozen=True)
class PolicyCase:
    policy: str
    build: Callable[[], nn.Module]
    largest_tensor: str
    largest_tensor_rule: str

    @property
    def path(self) -> Path:
        return POLICY_DIR / f"{self.policy}.yaml"


CASES = [
    PolicyCase(
        policy="gpt2",
        build=build_gpt2,
        largest_tensor="transformer.wte.weight",
        largest_tensor_rule="projection and embedding weights",
    ),
    PolicyCase(
        policy="bert",
        build=build_bert,
        largest_tensor="embeddings.word_embeddings.weight",
        largest_tensor_rule="dense and embedding weights",
    ),
    PolicyCase(
        policy="llama",
        build=build_llama,
        largest_tensor="model.embed_tokens.weight",
        largest_tensor_rule="projection and embedding weights",
    ),
]
CASE_IDS = [case.policy for case in CASES]


def build_reference(case: PolicyCase) -> nn.Module:
    torch.manual_seed(0)
    return case.build()


def build_with_policy(
    case: PolicyCase, policy: Path | initrules.Policy
) -> tuple[nn.Module, initrules.Report]:
    """Build the model, fill its parameters with NaN, then initialize it with `policy`.

    The NaN fill makes a parameter that the policy leaves untouched fail the
    comparison instead of passing with the values transformers gave it.
    """
    model = case.build()
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(float("nan"))
    report = initrules.apply(model, policy, seed=1)
    return model, report


def scale_rule_std(policy_text: str, rule_name: str, factor: float) -> str:
    """Return the policy YAML with the std of the named rule multiplied by `factor`."""
    document = yaml.safe_load(policy_text)
    rules = [rule for rule in document["rules"] if rule.get("name") == rule_name]
    assert len(rules) == 1, f"expected one rule named {rule_name!r}, found {len(rules)}"
    std = rules[0]["init"]["std"]
    # A std may be a number or an arithmetic expression in a string.
    rules[0]["init"]["std"] = (
        f"({std}) * {factor!r}" if isinstance(std, str) else std * factor
    )
    return yaml.safe_dump(document, sort_keys=False)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_policy_matches_transformers_init(case: PolicyCase) -> None:
    reference = build_reference(case)
    model, report = build_with_policy(case, case.path)

    assert report.unmatched == []
    reported_names = {row.name for row in report.rows}
    parameter_names = {name for name, _ in model.named_parameters()}
    assert parameter_names - reported_names == set()
    mismatches = compare_to_reference(reference, model)
    assert mismatches == [], "\n".join(mismatches)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_comparison_detects_five_percent_std_error(case: PolicyCase) -> None:
    text = scale_rule_std(case.path.read_text(), case.largest_tensor_rule, 1.05)
    policy = initrules.load_policy(text=text)
    reference = build_reference(case)
    model, _ = build_with_policy(case, policy)

    mismatches = compare_to_reference(reference, model)
    prefix = f"{case.largest_tensor}: std "
    flagged = [line for line in mismatches if line.startswith(prefix)]
    assert flagged, "no std mismatch for the largest tensor:\n" + "\n".join(mismatches)


@pytest.mark.parametrize("n_layer", [2, 12, 24])
def test_gpt2_residual_std_follows_config(n_layer: int) -> None:
    # The residual rule reads initializer_range and n_layer from the model's
    # config, so no depth needs its own policy.
    config = GPT2Config(
        n_layer=n_layer,
        n_embd=HIDDEN_SIZE,
        n_head=4,
        vocab_size=VOCAB_SIZE,
        n_positions=MAX_POSITIONS,
        bos_token_id=VOCAB_SIZE - 1,
        eos_token_id=VOCAB_SIZE - 1,
    )
    report = initrules.apply(GPT2LMHeadModel(config), POLICY_DIR / "gpt2.yaml", seed=0)
    expected = config.initializer_range / math.sqrt(2 * n_layer)
    row = report.row("transformer.h.0.attn.c_proj.weight")

    assert row.args["std"] == pytest.approx(expected, rel=1e-12)
    assert row.expected_std == pytest.approx(expected, rel=1e-12)
