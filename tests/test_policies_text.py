"""Check the shipped policies t5.yaml and llama-depth.yaml.

t5.yaml is checked against transformers' own initialization: each case builds a small
model twice, once initialized by transformers and once filled with NaN and then
initialized by `initrules.apply`, and compares them tensor by tensor with
`compare_to_reference`. llama-depth.yaml reproduces torchtitan, which is not installed,
so its tests check each tensor against torchtitan's formula instead.
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
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    T5Config,
    T5ForConditionalGeneration,
    T5Model,
)

import initrules

POLICY_DIR = Path(__file__).parents[1] / "policies"
T5_POLICY = POLICY_DIR / "t5.yaml"
LLAMA_DEPTH_POLICY = POLICY_DIR / "llama-depth.yaml"

# Standard errors accepted between a measured std or mean and the expected one.
SIGMAS = 5.0

# --- t5.yaml against transformers ---------------------------------------------------

# The base size. num_heads * d_kv equals d_model here, so the gated case below uses
# other sizes, where every std of t5.yaml comes from a different expression.
T5_SIZES = dict(
    d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2, vocab_size=1000
)


def build_t5_relu() -> nn.Module:
    return T5ForConditionalGeneration(T5Config(**T5_SIZES))


def build_t5_untied_flag() -> nn.Module:
    # T5 v1.1 checkpoints set tie_word_embeddings=False. transformers 5.25.0 keeps that
    # only as scale_decoder_outputs and still ties lm_head to shared.
    return T5ForConditionalGeneration(T5Config(**T5_SIZES, tie_word_embeddings=False))


def build_t5_untied_embeddings() -> nn.Module:
    # T5Config's constructor forces tie_word_embeddings to True, so the attribute is set
    # afterwards. The model then keeps shared, both embed_tokens and lm_head as four
    # separate tensors, and _init_weights takes its branch for an untied lm_head.
    config = T5Config(**T5_SIZES)
    config.tie_word_embeddings = False
    return T5ForConditionalGeneration(config)


def build_t5_gated() -> nn.Module:
    # T5 v1.1's gated feed-forward, with num_heads * d_kv (24), d_model (48) and
    # d_ff (80) all different, fewer decoder than encoder layers, and
    # initializer_factor 0.5, so a rule that reads the wrong config field gets a
    # different std.
    config = T5Config(
        d_model=48,
        d_ff=80,
        d_kv=8,
        num_heads=3,
        num_layers=2,
        num_decoder_layers=1,
        vocab_size=1000,
        feed_forward_proj="gated-gelu",
        initializer_factor=0.5,
    )
    return T5ForConditionalGeneration(config)


def build_t5_model() -> nn.Module:
    return T5Model(T5Config(**T5_SIZES))


@dataclass(frozen=True)
class T5Case:
    name: str
    build: Callable[[], nn.Module]


T5_CASES = [
    T5Case("relu", build_t5_relu),
    T5Case("untied-flag", build_t5_untied_flag),
    T5Case("untied-embeddings", build_t5_untied_embeddings),
    T5Case("gated", build_t5_gated),
    T5Case("t5model", build_t5_model),
]
T5_CASE_IDS = [case.name for case in T5_CASES]


def build_reference(build: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return build()


def apply_to_nan_model(
    build: Callable[[], nn.Module], policy: Path | initrules.Policy
) -> tuple[nn.Module, initrules.Report]:
    """Build a model, fill every parameter with NaN, then initialize it with `policy`.

    A parameter that the policy leaves alone then fails the comparison, instead of
    passing with the values transformers gave it.
    """
    model = build()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(float("nan"))
    report = initrules.apply(model, policy, seed=1)
    return model, report


def reported_names(report: initrules.Report) -> set[str]:
    """Return every tensor name in the report, aliases of tied tensors included."""
    names = set()
    for row in report.rows:
        names.add(row.name)
        names.update(row.aliases)
    return names


def largest_random_row(report: initrules.Report) -> initrules.report.Row:
    random_rows = [
        row for row in report.rows if row.scheme in ("normal", "trunc_normal")
    ]
    return max(random_rows, key=lambda row: math.prod(row.shape))


def policy_with_scaled_std(
    path: Path, rule_name: str, factor: float
) -> initrules.Policy:
    """Load the policy at `path` with the std of the rule `rule_name` times `factor`.

    The std becomes the expression `factor * (std)`, which works for a number and for
    an expression alike.
    """
    document = yaml.safe_load(path.read_text())
    matching = [rule for rule in document["rules"] if rule.get("name") == rule_name]
    assert len(matching) == 1, (
        f"{path.name} has {len(matching)} rules named {rule_name!r}"
    )
    init = matching[0]["init"]
    init["std"] = f"{factor!r} * ({init['std']})"
    return initrules.load_policy(text=yaml.safe_dump(document, sort_keys=False))


@pytest.mark.parametrize("case", T5_CASES, ids=T5_CASE_IDS)
def test_t5_matches_transformers_init(case: T5Case) -> None:
    reference = build_reference(case.build)
    model, report = apply_to_nan_model(case.build, T5_POLICY)

    assert report.unmatched == []
    all_names = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    assert all_names - reported_names(report) == set()
    mismatches = compare_to_reference(reference, model)
    assert mismatches == [], "\n".join(mismatches)


def test_t5_untied_flag_keeps_lm_head_tied() -> None:
    # t5.yaml's comments rely on this behavior of transformers 5.25.0.
    model = build_t5_untied_flag()

    assert model.config.tie_word_embeddings is True
    assert model.config.scale_decoder_outputs is False
    assert model.lm_head.weight is model.shared.weight


def test_t5_rules_read_config_sizes() -> None:
    # The relative attention bias table has num_buckets * num_heads elements (96 here),
    # too few for compare_to_reference to catch a std that is off by less than about
    # half, so this test checks each rule's resolved std against transformers' formula.
    config = build_t5_gated().config
    report = initrules.apply(build_t5_gated(), T5_POLICY, seed=0)
    factor = config.initializer_factor
    block = "encoder.block.0.layer"
    expected_stds = {
        f"{block}.0.SelfAttention.q.weight": factor
        / math.sqrt(config.d_model * config.d_kv),
        f"{block}.0.SelfAttention.k.weight": factor / math.sqrt(config.d_model),
        f"{block}.0.SelfAttention.v.weight": factor / math.sqrt(config.d_model),
        f"{block}.0.SelfAttention.o.weight": factor
        / math.sqrt(config.num_heads * config.d_kv),
        f"{block}.0.SelfAttention.relative_attention_bias.weight": factor
        / math.sqrt(config.d_model),
        f"{block}.1.DenseReluDense.wi_0.weight": factor / math.sqrt(config.d_model),
        f"{block}.1.DenseReluDense.wi_1.weight": factor / math.sqrt(config.d_model),
        f"{block}.1.DenseReluDense.wo.weight": factor / math.sqrt(config.d_ff),
        "shared.weight": factor,
    }

    for name, expected in expected_stds.items():
        assert report.row(name).args["std"] == pytest.approx(expected, rel=1e-12), name
    assert report.row(f"{block}.0.layer_norm.weight").args["val"] == factor


def test_t5_comparison_detects_five_percent_std_error() -> None:
    report = initrules.apply(build_t5_relu(), T5_POLICY, seed=0)
    largest = largest_random_row(report)
    policy = policy_with_scaled_std(T5_POLICY, largest.rule_name, 1.05)
    reference = build_reference(build_t5_relu)
    model, _ = apply_to_nan_model(build_t5_relu, policy)

    mismatches = compare_to_reference(reference, model)
    flagged = [line for line in mismatches if line.startswith(f"{largest.name}: std ")]
    assert flagged, f"no std mismatch for {largest.name}:\n" + "\n".join(mismatches)


# --- llama-depth.yaml against torchtitan's formula -----------------------------------

LLAMA_LAYERS = 4
LLAMA_HIDDEN_SIZE = 64
DEPTH_SCALED = ("self_attn.o_proj", "mlp.down_proj", "mlp.up_proj")
UNSCALED = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj")
# The default bounds of torch.nn.init.trunc_normal_, which torchtitan keeps for these
# weights.
TORCH_DEFAULT_BOUNDS = (-2.0, 2.0)


def llama_config() -> LlamaConfig:
    return LlamaConfig(
        hidden_size=LLAMA_HIDDEN_SIZE,
        intermediate_size=4 * LLAMA_HIDDEN_SIZE,
        num_hidden_layers=LLAMA_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
        max_position_embeddings=128,
    )


def torchtitan_block_std(layer: int) -> float:
    """Return torchtitan's init_std for block `layer` (0-based) with depth_init=True."""
    return 0.02 / math.sqrt(2 * (layer + 1))


def truncated_normal_std(std: float, a: float, b: float) -> float:
    """Return the std of N(0, std**2) truncated to [a, b]."""
    alpha = a / std
    beta = b / std

    def density(x: float) -> float:
        return math.exp(-x * x / 2) / math.sqrt(2 * math.pi)

    def cumulative(x: float) -> float:
        return (1 + math.erf(x / math.sqrt(2))) / 2

    mass = cumulative(beta) - cumulative(alpha)
    shift = (density(alpha) - density(beta)) / mass
    variance = 1 + (alpha * density(alpha) - beta * density(beta)) / mass - shift**2
    return std * math.sqrt(variance)


def moment_mismatches(
    name: str, values: torch.Tensor, expected_std: float
) -> list[str]:
    """Compare the mean and std of `values` with 0 and `expected_std`.

    The standard errors are those of a normal sample, s / sqrt(n) for the mean and
    s / sqrt(2n) for the std. Truncation only lowers the kurtosis, which makes the
    second one an overestimate.
    """
    values = values.detach().double().flatten()
    count = values.numel()
    std = values.std().item()
    mean = values.mean().item()
    mismatches = []
    std_tolerance = SIGMAS * expected_std / math.sqrt(2 * count)
    if abs(std - expected_std) > std_tolerance:
        mismatches.append(
            f"{name}: std {std:.6g}, expected {expected_std:.6g} "
            f"(tolerance {std_tolerance:.3g}, n={count})"
        )
    mean_tolerance = SIGMAS * expected_std / math.sqrt(count)
    if abs(mean) > mean_tolerance:
        mismatches.append(
            f"{name}: mean {mean:.6g}, expected 0 (tolerance {mean_tolerance:.3g})"
        )
    return mismatches


def depth_formula_mismatches(model: nn.Module, report: initrules.Report) -> list[str]:
    """Check every block's projections against torchtitan's per-block formula.

    Returns one line per disagreement: a resolved std that is not the formula's value,
    bounds that are not torch's defaults, or a measured mean or std that is more than
    SIGMAS standard errors from the truncated normal's.
    """
    parameters = dict(model.named_parameters())
    mismatches = []
    for layer in range(model.config.num_hidden_layers):
        expected_by_projection = dict.fromkeys(
            DEPTH_SCALED, torchtitan_block_std(layer)
        )
        expected_by_projection.update(dict.fromkeys(UNSCALED, 0.02))
        for projection, expected in expected_by_projection.items():
            name = f"model.layers.{layer}.{projection}.weight"
            row = report.row(name)
            if row.scheme != "trunc_normal":
                mismatches.append(f"{name}: scheme {row.scheme}, expected trunc_normal")
                continue
            if not math.isclose(row.args["std"], expected, rel_tol=1e-12):
                mismatches.append(
                    f"{name}: std argument {row.args['std']!r}, expected {expected!r}"
                )
            bounds = (row.args["a"], row.args["b"])
            if bounds != TORCH_DEFAULT_BOUNDS:
                mismatches.append(
                    f"{name}: bounds {bounds}, expected {TORCH_DEFAULT_BOUNDS}"
                )
            expected_std = truncated_normal_std(expected, *TORCH_DEFAULT_BOUNDS)
            mismatches.extend(moment_mismatches(name, parameters[name], expected_std))
    return mismatches


def policy_with_layer_count_std() -> initrules.Policy:
    """Load llama-depth.yaml with torchtitan's depth_init=False std for every block.

    That is 0.02 / sqrt(2 * num_hidden_layers), the same for all blocks, and equal to
    the depth-scaled std of the last block only.
    """
    document = yaml.safe_load(LLAMA_DEPTH_POLICY.read_text())
    (rule,) = [
        rule
        for rule in document["rules"]
        if rule.get("name") == "depth-scaled projections"
    ]
    rule["init"]["std"] = "0.02 / sqrt(2 * config.num_hidden_layers)"
    return initrules.load_policy(text=yaml.safe_dump(document, sort_keys=False))


@pytest.fixture(scope="module")
def llama_depth() -> tuple[nn.Module, initrules.Report]:
    return apply_to_nan_model(
        lambda: LlamaForCausalLM(llama_config()), LLAMA_DEPTH_POLICY
    )


def test_llama_depth_covers_every_parameter(
    llama_depth: tuple[nn.Module, initrules.Report],
) -> None:
    model, report = llama_depth

    assert report.unmatched == []
    all_names = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    assert all_names - reported_names(report) == set()
    for name, parameter in model.named_parameters():
        assert torch.isfinite(parameter).all(), name


@pytest.mark.parametrize("layer", range(LLAMA_LAYERS))
@pytest.mark.parametrize("projection", DEPTH_SCALED)
def test_llama_depth_std_argument(
    llama_depth: tuple[nn.Module, initrules.Report], layer: int, projection: str
) -> None:
    _, report = llama_depth
    row = report.row(f"model.layers.{layer}.{projection}.weight")

    assert row.args["std"] == pytest.approx(torchtitan_block_std(layer), rel=1e-12)


def test_llama_depth_follows_formula(
    llama_depth: tuple[nn.Module, initrules.Report],
) -> None:
    model, report = llama_depth

    mismatches = depth_formula_mismatches(model, report)
    assert mismatches == [], "\n".join(mismatches)


def test_llama_depth_output_projection(
    llama_depth: tuple[nn.Module, initrules.Report],
) -> None:
    model, report = llama_depth
    std = LLAMA_HIDDEN_SIZE**-0.5
    row = report.row("lm_head.weight")
    weight = model.lm_head.weight.detach()

    assert row.scheme == "trunc_normal"
    assert row.args["std"] == pytest.approx(std, rel=1e-12)
    assert row.args["a"] == pytest.approx(-3 * std, rel=1e-12)
    assert row.args["b"] == pytest.approx(3 * std, rel=1e-12)
    assert weight.min().item() >= -3 * std
    assert weight.max().item() <= 3 * std
    truncated_std = truncated_normal_std(std, -3 * std, 3 * std)
    assert moment_mismatches("lm_head.weight", weight, truncated_std) == []


def test_llama_depth_embeddings_and_norms(
    llama_depth: tuple[nn.Module, initrules.Report],
) -> None:
    model, report = llama_depth
    embedding = model.model.embed_tokens.weight

    assert report.row("model.embed_tokens.weight").args["std"] == 1.0
    assert moment_mismatches("model.embed_tokens.weight", embedding, 1.0) == []
    for name, parameter in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(parameter, torch.ones_like(parameter)), name


def test_llama_depth_fits_llama_model() -> None:
    # LlamaModel has no "model." prefix and no lm_head.
    report = initrules.apply(LlamaModel(llama_config()), LLAMA_DEPTH_POLICY, seed=0)

    assert report.unmatched == []
    row = report.row("layers.2.mlp.down_proj.weight")
    assert row.args["std"] == pytest.approx(torchtitan_block_std(2), rel=1e-12)


def test_llama_depth_formula_check_detects_layer_count() -> None:
    model, report = apply_to_nan_model(
        lambda: LlamaForCausalLM(llama_config()), policy_with_layer_count_std()
    )

    mismatches = depth_formula_mismatches(model, report)
    # The layer-count std equals the depth-scaled std of the last block only.
    for layer in range(LLAMA_LAYERS - 1):
        for projection in DEPTH_SCALED:
            prefix = f"model.layers.{layer}.{projection}.weight: std argument"
            assert any(line.startswith(prefix) for line in mismatches), prefix
    last_block = f"model.layers.{LLAMA_LAYERS - 1}."
    assert not any(line.startswith(last_block) for line in mismatches)
