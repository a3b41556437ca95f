"""Checks that `initrules.apply` and `initrules.check` run on initialized tensors.

Models are real `torch.nn` modules or small transformers models built from their
config classes, and policies are YAML text or files written to `tmp_path`. Every
random draw comes from a fixed seed or a seeded generator, so every run draws the
same values.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
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
from initrules import CheckError, InitRulesWarning, Report

POLICY_DIR = Path(__file__).parents[1] / "policies"
GPT2_POLICY = POLICY_DIR / "gpt2.yaml"

VOCAB_SIZE = 1000
SMALL_WIDTH = 64
MAX_POSITIONS = 128

# The rule of gpt2.yaml that draws c_attn, c_fc, wte and wpe from N(0, 0.02).
PROJECTION_RULE = "  - name: projection and embedding weights\n"
PROJECTION_INIT = 'init: {scheme: normal, mean: 0.0, std: "config.initializer_range"}\n'


# --- models and policies ---------------------------------------------------------


def build_gpt2(
    *, width: int = SMALL_WIDTH, heads: int = 4, layers: int = 12
) -> nn.Module:
    config = GPT2Config(
        n_layer=layers,
        n_embd=width,
        n_head=heads,
        vocab_size=VOCAB_SIZE,
        n_positions=MAX_POSITIONS,
        bos_token_id=VOCAB_SIZE - 1,
        eos_token_id=VOCAB_SIZE - 1,
    )
    return GPT2LMHeadModel(config)


def build_wide_gpt2(layers: int = 1) -> nn.Module:
    """Return GPT-2 at the default width 768, where sqrt(2 / fan_in) is 0.051."""
    return build_gpt2(width=768, heads=12, layers=layers)


def build_bert() -> nn.Module:
    config = BertConfig(
        hidden_size=SMALL_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=4 * SMALL_WIDTH,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=MAX_POSITIONS,
    )
    return BertModel(config, add_pooling_layer=True)


def build_llama() -> nn.Module:
    config = LlamaConfig(
        hidden_size=SMALL_WIDTH,
        intermediate_size=4 * SMALL_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=MAX_POSITIONS,
    )
    return LlamaForCausalLM(config)


BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "gpt2": build_gpt2,
    "bert": build_bert,
    "llama": build_llama,
}


class Holder(nn.Module):
    """Module with one weight of any shape, of a type the scale check skips.

    `true_fan_in` returns None for this module, so only the statistics, bounds and
    finite checks judge the weight.
    """

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(shape))


def gpt2_policy_text(
    std: str = "0.2", *, rule_lines: str = "", top_lines: str = ""
) -> str:
    """Return gpt2.yaml with the projection rule's std replaced and lines added.

    `rule_lines` go into the projection rule right after its `init`, so they need
    four spaces of indentation. `top_lines` go right before `rules:`. Without
    `top_lines`, every line up to the projection rule keeps its number.
    """
    text = GPT2_POLICY.read_text()
    start = text.index(PROJECTION_RULE)
    at = text.index(PROJECTION_INIT, start)
    replacement = f"init: {{scheme: normal, mean: 0.0, std: {std}}}\n" + rule_lines
    text = text[:at] + replacement + text[at + len(PROJECTION_INIT) :]
    if top_lines:
        text = text.replace("\nrules:\n", f"\n{top_lines}rules:\n", 1)
    return text


def write_policy(tmp_path: Path, text: str, name: str = "policy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def projection_rule_line(text: str) -> int:
    """Return the 1-based line on which the projection rule starts."""
    return text[: text.index(PROJECTION_RULE)].count("\n") + 1


def weight_policy(
    init: str, *, rule_extra: str = "", top: str = ""
) -> initrules.Policy:
    """Return a policy whose rule 1 gives every `weight` `init`.

    Without `top`, rule 1 starts at line 3, column 5. Rule 2 zeroes biases.
    `rule_extra` is added inside rule 1's flow mapping, so it starts with a comma.
    """
    text = (
        f"version: 1\n{top}rules:\n"
        f"  - {{match: {{param: weight}}, init: {init}{rule_extra}}}\n"
        "  - {match: {param: bias}, init: zeros}\n"
    )
    return initrules.load_policy(text=text)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def changed_tensors(before: dict[str, torch.Tensor], model: nn.Module) -> list[str]:
    """Return the names whose values differ from `before` by `torch.equal`."""
    after = model.state_dict()
    return [
        name for name, value in before.items() if not torch.equal(value, after[name])
    ]


def check_names(report: Report) -> list[str]:
    return [failure.check for failure in report.failures]


def failed_tensors(report: Report) -> list[str]:
    return sorted(failure.tensor for failure in report.failures)


@pytest.fixture(scope="module")
def wide_gpt2_policy_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Return gpt2.yaml with the projection rule's std raised from 0.02 to 0.2."""
    directory = tmp_path_factory.mktemp("wide")
    return write_policy(directory, gpt2_policy_text("0.2"), "gpt2_std_0.2.yaml")


# --- no false alarms ----------------------------------------------------------------


@pytest.mark.parametrize("architecture", list(BUILDERS))
def test_shipped_policy_ok_over_seeds(architecture: str) -> None:
    model = BUILDERS[architecture]()
    policy = initrules.load_policy(POLICY_DIR / f"{architecture}.yaml")

    for seed in range(20):
        report = initrules.apply(model, policy, seed=seed)
        assert report.ok, f"seed {seed}: {report.failures}"
        assert report.failures == []
        assert report.checked


@pytest.mark.parametrize("architecture", list(BUILDERS))
def test_check_after_apply_ok(architecture: str) -> None:
    model = BUILDERS[architecture]()
    policy = initrules.load_policy(POLICY_DIR / f"{architecture}.yaml")
    initrules.apply(model, policy, seed=3)

    report = initrules.check(model, policy)

    assert report.failures == []


def test_shipped_gpt2_ok_default_width() -> None:
    model = build_wide_gpt2(layers=12)

    report = initrules.apply(model, GPT2_POLICY, seed=0)

    assert report.ok
    assert report.failures == []


# --- wrong policies caught before writing ----------------------------------------


def test_wrong_std_raises_before_writing(wide_gpt2_policy_file: Path) -> None:
    model = build_wide_gpt2()
    before = snapshot(model)

    with pytest.raises(CheckError) as caught:
        initrules.apply(model, wide_gpt2_policy_file, seed=0)

    report = caught.value.report
    assert set(check_names(report)) == {"scale"}
    assert failed_tensors(report) == [
        "transformer.h.0.attn.c_attn.weight",
        "transformer.h.0.mlp.c_fc.weight",
    ]
    assert report.rows == []
    assert changed_tensors(before, model) == []
    assert "nothing was written" in str(caught.value)


def test_wrong_std_names_rule_location(wide_gpt2_policy_file: Path) -> None:
    model = build_wide_gpt2()
    line = projection_rule_line(wide_gpt2_policy_file.read_text())
    location = f"{wide_gpt2_policy_file}:{line}:5"

    with pytest.raises(CheckError) as caught:
        initrules.apply(model, wide_gpt2_policy_file, seed=0)

    for failure in caught.value.report.failures:
        assert location in failure.message
        assert (
            failure.rule == f"rule 2 'projection and embedding weights' at {location}"
        )


def test_far_mean_raises_before_writing() -> None:
    model = nn.Linear(64, 64)
    before = snapshot(model)
    policy = weight_policy("{scheme: normal, mean: 100, std: 0.1}")

    with pytest.raises(CheckError) as caught:
        initrules.apply(model, policy, seed=0)

    report = caught.value.report
    assert check_names(report) == ["scale"]
    assert "mean 100 (the arguments imply) exceeds the std 0.1" in (
        report.failures[0].message
    )
    assert report.failures[0].measured == 100
    assert report.rows == []
    assert changed_tensors(before, model) == []


def test_failure_after_writing_raises() -> None:
    # max_abs cannot be judged from a normal's arguments, since its support is
    # unbounded, so this failure is found on the written values.
    model = nn.Linear(64, 64)
    before = snapshot(model)
    policy = weight_policy(
        "{scheme: normal, std: 0.02}", rule_extra=", expect: {max_abs: 0.01}"
    )

    with pytest.raises(CheckError) as caught:
        initrules.apply(model, policy, seed=0)

    report = caught.value.report
    assert check_names(report) == ["expect"]
    assert "largest magnitude" in report.failures[0].message
    assert len(report.rows) == 2
    assert changed_tensors(before, model) == ["weight", "bias"]
    assert "the tensors are written" in str(caught.value)


# --- policy and per-rule switches ---------------------------------------------------


def test_warn_mode_writes_and_reports(tmp_path: Path) -> None:
    text = gpt2_policy_text("0.2", top_lines="checks: {on_failure: warn}\n")
    path = write_policy(tmp_path, text)
    model = build_wide_gpt2()
    before = snapshot(model)

    with pytest.warns(InitRulesWarning, match="check\\(s\\) failed"):
        report = initrules.apply(model, path, seed=0)

    assert set(check_names(report)) == {"scale"}
    assert failed_tensors(report) == [
        "transformer.h.0.attn.c_attn.weight",
        "transformer.h.0.mlp.c_fc.weight",
    ]
    assert "transformer.h.0.attn.c_attn.weight" in changed_tensors(before, model)
    written = report.row("transformer.h.0.attn.c_attn.weight")
    assert written.std == pytest.approx(0.2, rel=0.01)


def test_warn_mode_warns_once() -> None:
    model = nn.Linear(512, 512)
    policy = weight_policy(
        "{scheme: normal, std: 1.0e-5}", top="checks: {on_failure: warn}\n"
    )

    with pytest.warns(InitRulesWarning) as record:
        initrules.apply(model, policy, seed=0)

    assert len(record) == 1


def test_disabled_checks_report_nothing(tmp_path: Path) -> None:
    text = gpt2_policy_text("0.2", top_lines="checks: {enabled: false}\n")
    path = write_policy(tmp_path, text)
    model = build_wide_gpt2()

    report = initrules.apply(model, path, seed=0)

    assert report.failures == []
    assert report.checked is False
    assert str(report).splitlines()[-1] == "checks did not run"
    assert report.row("transformer.h.0.mlp.c_fc.weight").std == pytest.approx(
        0.2, rel=0.01
    )


def test_enabled_checks_say_passed() -> None:
    report = initrules.apply(nn.Linear(64, 64), weight_policy("xavier_uniform"), seed=0)

    assert report.checked is True
    assert str(report).splitlines()[-1] == "all checks passed"


def test_rule_scale_off_silences_rule(tmp_path: Path) -> None:
    text = gpt2_policy_text("0.2", rule_lines="    checks: {scale: false}\n")
    path = write_policy(tmp_path, text)

    report = initrules.apply(build_wide_gpt2(), path, seed=0)

    assert report.failures == []


def test_rule_scale_off_only_that_rule() -> None:
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    policy = initrules.load_policy(
        text=(
            "rules:\n"
            "  - match: {name: '0.weight'}\n"
            "    init: {scheme: normal, std: 1.0}\n"
            "    checks: {scale: false}\n"
            "  - match: {name: '1.weight'}\n"
            "    init: {scheme: normal, std: 1.0}\n"
            "  - {match: {param: bias}, init: zeros}\n"
        )
    )

    with pytest.raises(CheckError) as caught:
        initrules.apply(model, policy, seed=0)

    assert check_names(caught.value.report) == ["scale"]
    assert failed_tensors(caught.value.report) == ["1.weight"]


def test_rule_expect_exempts_scale(tmp_path: Path) -> None:
    text = gpt2_policy_text("0.2", rule_lines="    expect: {std: [0.1, 0.3]}\n")
    path = write_policy(tmp_path, text)
    model = build_wide_gpt2()

    report = initrules.apply(model, path, seed=0)

    assert report.failures == []
    assert report.row("transformer.h.0.attn.c_attn.weight").std == pytest.approx(
        0.2, rel=0.01
    )


def test_rule_expect_miss_raises_before_writing(tmp_path: Path) -> None:
    text = gpt2_policy_text("0.2", rule_lines="    expect: {std: [0.01, 0.05]}\n")
    path = write_policy(tmp_path, text)
    model = build_wide_gpt2()
    before = snapshot(model)

    with pytest.raises(CheckError) as caught:
        initrules.apply(model, path, seed=0)

    report = caught.value.report
    assert set(check_names(report)) == {"expect"}
    assert failed_tensors(report) == [
        "transformer.h.0.attn.c_attn.weight",
        "transformer.h.0.mlp.c_fc.weight",
        "transformer.wpe.weight",
        "transformer.wte.weight",
    ]
    assert report.rows == []
    assert changed_tensors(before, model) == []


# --- check() on tensors written outside initrules --------------------------------

TRUNC_NORMAL = "{scheme: trunc_normal, std: 0.02, a: -0.04, b: 0.04}"
BF16_BOUND = torch.tensor(0.04, dtype=torch.bfloat16)


def trunc_normal_bf16_linear(seed: int) -> tuple[nn.Linear, initrules.Policy]:
    model = nn.Linear(1024, 1024).to(torch.bfloat16)
    policy = weight_policy(TRUNC_NORMAL)
    initrules.apply(model, policy, seed=seed)
    return model, policy


def plant_on_bounds(weight: torch.Tensor, fraction: float, seed: int) -> None:
    """Set `fraction` of the values, chosen at random, to -0.04 or 0.04 in bfloat16."""
    generator = torch.Generator().manual_seed(seed)
    flat = weight.detach().view(-1)
    count = round(fraction * flat.numel())
    positions = torch.randperm(flat.numel(), generator=generator)[:count]
    signs = torch.randint(0, 2, (count,), generator=generator) * 2 - 1
    with torch.no_grad():
        flat[positions] = signs.to(torch.bfloat16) * BF16_BOUND


def values_on_bounds(weight: torch.Tensor) -> int:
    on_bounds = (weight == BF16_BOUND) | (weight == -BF16_BOUND)
    return int(on_bounds.sum())


@pytest.mark.parametrize("seed", range(4))
def test_check_bf16_trunc_normal_ok(seed: int) -> None:
    model, policy = trunc_normal_bf16_linear(seed)

    report = initrules.check(model, policy)

    assert report.failures == []


def test_check_bf16_clamped_draw_fails() -> None:
    model, policy = trunc_normal_bf16_linear(seed=0)
    plant_on_bounds(model.weight, 0.002, seed=0)

    report = initrules.check(model, policy)

    assert check_names(report) == ["bounds"]
    assert failed_tensors(report) == ["weight"]


def test_check_nan_fails_finite() -> None:
    model = nn.Linear(2048, 2048)
    policy = weight_policy("{scheme: normal, std: 0.02}")
    initrules.apply(model, policy, seed=0)
    with torch.no_grad():
        model.weight[1000, 17] = float("nan")

    report = initrules.check(model, policy)

    assert check_names(report) == ["finite"]
    assert failed_tensors(report) == ["weight"]
    assert report.failures[0].measured == 1.0
    assert "1 of 4194304 values" in report.failures[0].message


def untied_gpt2() -> nn.Module:
    """Return GPT-2 after apply, with lm_head given its own copy of the embedding."""
    model = build_gpt2(layers=1)
    initrules.apply(model, GPT2_POLICY, seed=0)
    copy = model.transformer.wte.weight.detach().clone()
    model.lm_head.weight = nn.Parameter(copy)
    return model


def test_check_untied_head_fails_ties() -> None:
    model = untied_gpt2()

    report = initrules.check(model, GPT2_POLICY)

    assert check_names(report) == ["ties"]
    assert failed_tensors(report) == ["lm_head.weight"]


def test_check_tied_head_ok() -> None:
    model = build_gpt2(layers=1)
    initrules.apply(model, GPT2_POLICY, seed=0)

    report = initrules.check(model, GPT2_POLICY)

    assert report.failures == []


def widen_by_hand(weight: torch.Tensor, std: float) -> None:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        weight.normal_(0.0, std, generator=generator)


def std_statistics_failures(report: Report, expected_std: float) -> list[float]:
    """Return the measured std of each statistics failure that compares stds."""
    return [
        failure.measured
        for failure in report.failures
        if failure.check == "statistics"
        and failure.expected == pytest.approx(expected_std)
        and failure.measured is not None
    ]


def test_check_wide_linear_fails_statistics() -> None:
    model = nn.Linear(768, 768)
    policy = weight_policy("{scheme: normal, std: 0.02}")
    initrules.apply(model, policy, seed=0)
    widen_by_hand(model.weight, 0.2)

    report = initrules.check(model, policy)

    measured = std_statistics_failures(report, 0.02)
    assert len(measured) == 1
    assert measured[0] == pytest.approx(0.2, rel=0.01)
    assert set(failed_tensors(report)) == {"weight"}


def test_check_wide_gpt2_fails_statistics() -> None:
    model = build_wide_gpt2()
    initrules.apply(model, GPT2_POLICY, seed=0)
    widen_by_hand(model.transformer.h[0].attn.c_attn.weight, 0.2)

    report = initrules.check(model, GPT2_POLICY)

    assert len(std_statistics_failures(report, 0.02)) == 1
    assert set(failed_tensors(report)) == {"transformer.h.0.attn.c_attn.weight"}


def test_check_writes_nothing() -> None:
    model = untied_gpt2()
    widen_by_hand(model.transformer.h[0].mlp.c_fc.weight, 0.2)
    before = snapshot(model)

    report = initrules.check(model, GPT2_POLICY)

    assert "ties" in check_names(report)
    assert "statistics" in check_names(report)
    assert changed_tensors(before, model) == []


def test_check_never_raises() -> None:
    model = nn.Linear(64, 64)
    policy = weight_policy("{scheme: normal, mean: 100, std: 0.1}")

    report = initrules.check(model, policy)

    assert "scale" in check_names(report)


def test_check_reports_scale_once() -> None:
    model = nn.Linear(512, 512)
    policy = weight_policy(
        "{scheme: normal, std: 1.0e-5}", top="checks: {on_failure: warn}\n"
    )
    with pytest.warns(InitRulesWarning):
        initrules.apply(model, policy, seed=0)

    report = initrules.check(model, policy)

    assert check_names(report) == ["scale"]


# --- statistics check sensitivity ----------------------------------------------------

RANDOM_SCHEMES = {
    "normal": "{scheme: normal, mean: 0.5, std: 2.0}",
    "uniform": "{scheme: uniform, a: -1.0, b: 3.0}",
    "trunc_normal": "{scheme: trunc_normal, mean: 0.0, std: 1.0, a: -1.0, b: 2.0}",
    "xavier_uniform": "{scheme: xavier_uniform, gain: 2.0}",
    "xavier_normal": "xavier_normal",
    "kaiming_uniform": "{scheme: kaiming_uniform, nonlinearity: relu}",
    "kaiming_normal": "{scheme: kaiming_normal, mode: fan_out}",
    "orthogonal": "{scheme: orthogonal, gain: 1.5}",
    "sparse": "{scheme: sparse, sparsity: 0.3, std: 0.05}",
    "variance_scaling_truncated": "{scheme: variance_scaling, scale: 2.0}",
    "variance_scaling_normal": (
        "{scheme: variance_scaling, mode: fan_avg, distribution: normal}"
    ),
    "variance_scaling_uniform": (
        "{scheme: variance_scaling, mode: fan_out, distribution: uniform}"
    ),
    "lecun_normal": "lecun_normal",
}
CONSTANT_SCHEMES = {
    "constant": "{scheme: constant, val: -0.75}",
    "ones": "ones",
    "zeros": "zeros",
}
BIG_SHAPES = [(256, 128), (64, 32, 3, 3)]
SHAPES = [*BIG_SHAPES, (64, 3, 3, 3), (4, 3), (1, 7)]


def scheme_cases(
    schemes: dict[str, str], shapes: list[tuple[int, ...]]
) -> list[pytest.param]:
    cases = []
    for name, init in schemes.items():
        for shape in shapes:
            if name == "sparse" and len(shape) != 2:
                continue  # torch's sparse_ takes 2-D tensors only
            shape_id = "x".join(map(str, shape))
            cases.append(pytest.param(init, shape, id=f"{name}-{shape_id}"))
    return cases


def holder_policy(init: str) -> initrules.Policy:
    return initrules.load_policy(
        text=f"rules:\n  - {{match: {{param: weight}}, init: {init}}}\n"
    )


@pytest.mark.parametrize(
    ("init", "shape"), scheme_cases({**RANDOM_SCHEMES, **CONSTANT_SCHEMES}, SHAPES)
)
def test_statistics_ok_over_seeds(init: str, shape: tuple[int, ...]) -> None:
    model = Holder(shape)
    policy = holder_policy(init)

    for seed in range(10):
        report = initrules.apply(model, policy, seed=seed)
        assert report.failures == [], f"seed {seed}"
        assert initrules.check(model, policy).failures == [], f"check, seed {seed}"


@pytest.mark.parametrize(("init", "shape"), scheme_cases(RANDOM_SCHEMES, BIG_SHAPES))
def test_statistics_catch_scaled_by_1_1(init: str, shape: tuple[int, ...]) -> None:
    model = Holder(shape)
    policy = holder_policy(init)

    for seed in range(3):
        initrules.apply(model, policy, seed=seed)
        with torch.no_grad():
            model.weight.mul_(1.1)
        report = initrules.check(model, policy)
        assert "statistics" in check_names(report), f"seed {seed}"


@pytest.mark.parametrize(
    ("init", "shape"), scheme_cases(CONSTANT_SCHEMES, [*SHAPES, (1,)])
)
def test_statistics_catch_one_changed_constant(
    init: str, shape: tuple[int, ...]
) -> None:
    model = Holder(shape)
    policy = holder_policy(init)
    initrules.apply(model, policy, seed=0)
    with torch.no_grad():
        model.weight.view(-1)[-1] += 1.0

    report = initrules.check(model, policy)

    assert check_names(report) == ["statistics"]


# --- embedding padding rows ----------------------------------------------------------


def padding_policy(zero_padding_idx: bool) -> initrules.Policy:
    flag = str(zero_padding_idx).lower()
    return initrules.load_policy(
        text=(
            "rules:\n"
            "  - match: {param: weight}\n"
            "    init: {scheme: normal, std: 1.0}\n"
            f"    zero_padding_idx: {flag}\n"
        )
    )


@pytest.mark.parametrize("zero_padding_idx", [True, False])
def test_padding_row_ok_over_seeds(zero_padding_idx: bool) -> None:
    model = nn.Embedding(10, 64, padding_idx=0)
    policy = padding_policy(zero_padding_idx)

    for seed in range(20):
        report = initrules.apply(model, policy, seed=seed)
        assert report.failures == [], f"seed {seed}"
        padding_zero = bool((model.weight[0] == 0).all())
        assert padding_zero is zero_padding_idx, f"seed {seed}"


def test_padding_half_table_accounted() -> None:
    # One row of two is zeroed, so the expected std falls to sqrt(1/2) of the
    # draw's; without that correction every seed fails the std check.
    model = nn.Embedding(2, 4096, padding_idx=0)
    policy = padding_policy(zero_padding_idx=True)

    for seed in range(10):
        report = initrules.apply(model, policy, seed=seed)
        assert report.failures == [], f"seed {seed}"
        assert report.rows[0].expected_std == pytest.approx(math.sqrt(0.5))
        assert report.rows[0].note == "padding row 0 zeroed"


def test_check_after_padding_apply_ok() -> None:
    model = nn.Embedding(2, 4096, padding_idx=0)
    policy = padding_policy(zero_padding_idx=True)
    initrules.apply(model, policy, seed=0)

    report = initrules.check(model, policy)

    assert report.failures == []


# --- report API ----------------------------------------------------------------------


def nan_report() -> Report:
    model = nn.Linear(16, 16)
    policy = weight_policy("{scheme: normal, std: 0.1}")
    initrules.apply(model, policy, seed=0)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    return initrules.check(model, policy)


def test_raise_for_failures_carries_report() -> None:
    report = nan_report()

    with pytest.raises(CheckError) as caught:
        report.raise_for_failures()

    assert caught.value.report is report
    assert report.failures[0].message in str(caught.value)


def test_raise_for_failures_silent_when_ok() -> None:
    report = initrules.apply(nn.Linear(16, 16), weight_policy("xavier_normal"), seed=0)

    report.raise_for_failures()

    assert report.ok


def test_to_dict_serializes_failures() -> None:
    report = nan_report()

    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))

    assert [failure["check"] for failure in data["failures"]] == ["finite"]
    assert data["failures"][0]["tensor"] == "weight"
    assert data["failures"][0]["measured"] == 1.0
    assert data["checked"] is True
    assert data["rows"][0]["mean"] == "nan"


# --- pinned messages -----------------------------------------------------------------

SCALE_HINT = (
    "if this is intended, state it in the rule with "
    "'expect: {mean: [low, high], std: [low, high]}', or turn the check off with "
    "'checks: {scale: false}'"
)


def test_message_scale_above(wide_gpt2_policy_file: Path) -> None:
    line = projection_rule_line(wide_gpt2_policy_file.read_text())
    rule = (
        f"rule 2 'projection and embedding weights' at {wide_gpt2_policy_file}:{line}:5"
    )

    with pytest.raises(CheckError) as caught:
        initrules.apply(build_wide_gpt2(), wide_gpt2_policy_file, seed=0)

    assert caught.value.report.failures[0].message == (
        f"scale: 'transformer.h.0.attn.c_attn.weight' ({rule}): std 0.2 (the "
        "arguments imply) is 3.92x sqrt(2/fan_in) = 0.05103 for fan_in 768 of "
        f"Conv1D, above the accepted 0.01x to 3x; {SCALE_HINT}"
    )


def test_message_scale_below() -> None:
    policy = weight_policy("{scheme: normal, std: 1.0e-5}")

    with pytest.raises(CheckError) as caught:
        initrules.apply(nn.Linear(512, 512), policy, seed=0)

    assert caught.value.report.failures[0].message == (
        "scale: 'weight' (rule 1 at <text>:3:5): std 1e-05 (the arguments imply) is "
        "0.00016x sqrt(2/fan_in) = 0.0625 for fan_in 512 of Linear, below the "
        f"accepted 0.01x to 3x; {SCALE_HINT}"
    )


def test_message_scale_mean() -> None:
    policy = weight_policy("{scheme: normal, mean: 100, std: 0.1}")

    with pytest.raises(CheckError) as caught:
        initrules.apply(nn.Linear(64, 64), policy, seed=0)

    assert caught.value.report.failures[0].message == (
        "scale: 'weight' (rule 1 at <text>:3:5): mean 100 (the arguments imply) "
        "exceeds the std 0.1, so the weights of this Linear are far from "
        f"zero-centered; {SCALE_HINT}"
    )


def test_message_bounds() -> None:
    model, policy = trunc_normal_bf16_linear(seed=0)
    plant_on_bounds(model.weight, 0.002, seed=0)
    on_bounds = values_on_bounds(model.weight)

    report = initrules.check(model, policy)

    assert report.failures[0].message == (
        f"bounds: 'weight' (rule 1 at <text>:3:5): {on_bounds} of 1048576 values "
        f"({100 * on_bounds / 1048576:.3g}%) lie exactly on the bounds "
        "[-0.04004, 0.04004] of trunc_normal, but rounding to bfloat16 explains at "
        "most 887; the draw was clamped, not truncated"
    )


def test_message_bounds_outside() -> None:
    model = Holder((4, 3))
    policy = holder_policy("{scheme: uniform, a: -1.0, b: 1.0}")
    with torch.no_grad():
        model.weight.copy_(torch.linspace(-1.0, 1.0, 12).reshape(4, 3))
        model.weight[3, 2] = 1.5

    report = initrules.check(model, policy)

    assert report.failures[0].message == (
        "bounds: 'weight' (rule 1 at <text>:2:5): values range over [-1, 1.5], "
        "outside the bounds [-1, 1] of uniform"
    )


def test_message_finite() -> None:
    model = nn.Linear(2048, 2048)
    policy = weight_policy("{scheme: normal, std: 0.02}")
    initrules.apply(model, policy, seed=0)
    with torch.no_grad():
        model.weight[5, 7] = float("nan")

    report = initrules.check(model, policy)

    assert report.failures[0].message == (
        "finite: 'weight' (rule 1 at <text>:3:5): 1 of 4194304 values are NaN or Inf"
    )


def test_message_ties() -> None:
    report = initrules.check(untied_gpt2(), GPT2_POLICY)

    assert report.failures[0].message == (
        "ties: 'lm_head.weight': should be tied to 'transformer.wte.weight' (the "
        "model declares the tie in all_tied_weights_keys), but is a separate tensor; "
        "tie it again, for example with model.tie_weights()"
    )


def test_message_expect() -> None:
    policy = weight_policy(
        "{scheme: normal, std: 0.2}", rule_extra=", expect: {std: [0.01, 0.05]}"
    )

    with pytest.raises(CheckError) as caught:
        initrules.apply(nn.Linear(64, 64), policy, seed=0)

    assert caught.value.report.failures[0].message == (
        "expect: 'weight' (rule 1 at <text>:3:5): std 0.2 (the arguments imply) is "
        "outside the rule's expected [0.01, 0.05]"
    )


ORTHOGONAL_POLICY = """\
rules:
  - {match: {param: weight}, init: {scheme: orthogonal, gain: 1.5}}
  - {match: {param: bias}, init: zeros}
"""


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_orthogonal_passes_gram_check(dtype: torch.dtype) -> None:
    policy = initrules.load_policy(text=ORTHOGONAL_POLICY)
    for shape in ((512, 256), (256, 512)):
        model = nn.Linear(shape[1], shape[0]).to(dtype)
        assert initrules.apply(model, policy, seed=0).failures == []


def test_correlated_rows_fail_gram_check() -> None:
    # Same std as the orthogonal draw, but independent normal rows.
    policy = initrules.load_policy(text=ORTHOGONAL_POLICY)
    model = nn.Linear(512, 256)
    initrules.apply(model, policy, seed=0)
    with torch.no_grad():
        model.weight.normal_(0.0, float(model.weight.std()))
    failures = initrules.check(model, policy).failures
    assert [failure.check for failure in failures] == ["statistics"]
    assert "rows of the orthogonal matrix are not orthonormal" in failures[0].message


def policy_text(init: str, *extra: str) -> initrules.Policy:
    lines = [
        "rules:",
        f"  - {{match: {{param: weight}}, init: {init}{''.join(extra)}}}",
    ]
    lines.append("  - {match: {param: bias}, init: zeros}")
    return initrules.load_policy(text="\n".join(lines) + "\n")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_uniform_bound_rounded_inward_passes(dtype: torch.dtype) -> None:
    # 0.1 rounds to 0.09998 in float16, so every draw between the two lands on
    # the rounded bound; the bounds check counts that gap as rounding.
    policy = initrules.load_policy(
        text="checks: {scale: false}\n"
        "rules:\n"
        "  - {match: {param: weight}, init: {scheme: uniform, a: -0.1, b: 0.1}}\n"
        "  - {match: {param: bias}, init: zeros}\n"
    )
    model = nn.Linear(1024, 1024).to(dtype)
    for seed in range(3):
        assert initrules.apply(model, policy, seed=seed).failures == []


def test_eye_checked_exactly() -> None:
    policy = policy_text("eye")
    model = nn.Linear(8, 8)
    assert initrules.apply(model, policy, seed=0).ok
    with torch.no_grad():
        model.weight.mul_(2.0)
    failures = initrules.check(model, policy).failures
    assert [failure.check for failure in failures] == ["statistics"]
    assert failures[0].message.endswith("8 of 64 values differ from what eye writes")


def test_dirac_checked_exactly() -> None:
    policy = policy_text("dirac")
    model = nn.Conv2d(4, 4, 3)
    assert initrules.apply(model, policy, seed=0).ok
    with torch.no_grad():
        model.weight[0, 0, 0, 0] = 1.0
    failures = initrules.check(model, policy).failures
    assert [failure.check for failure in failures] == ["statistics"]


def test_dense_matrix_fails_sparse_check() -> None:
    policy = policy_text("{scheme: sparse, sparsity: 0.5, std: 0.01}")
    model = nn.Linear(64, 64)
    assert initrules.apply(model, policy, seed=0).ok
    with torch.no_grad():
        model.weight.normal_(0.0, float(model.weight.std()))
    failures = initrules.check(model, policy).failures
    assert "statistics" in [failure.check for failure in failures]
    assert any("zeroes 32 of the 64 values" in f.message for f in failures)


def test_keep_rule_expect_judged_by_apply() -> None:
    policy = initrules.load_policy(
        text="checks: {on_failure: warn}\n"
        "rules:\n"
        "  - match: {param: weight}\n"
        "    init: keep\n"
        "    expect: {std: [0.01, 0.03]}\n"
        "  - {match: {param: bias}, init: zeros}\n"
    )
    model = nn.Linear(64, 64)
    with torch.no_grad():
        model.weight.normal_(0.0, 5.0)
    with pytest.warns(initrules.InitRulesWarning):
        report = initrules.apply(model, policy, seed=0)
    assert [failure.check for failure in report.failures] == ["expect"]
    assert [failure.check for failure in initrules.check(model, policy).failures] == [
        "expect"
    ]


def test_constant_underflow_is_plan_error() -> None:
    policy = policy_text("{scheme: constant, val: 1.0e-8}")
    model = nn.Linear(4, 4).half()
    with pytest.raises(initrules.PlanError) as caught:
        initrules.apply(model, policy, seed=0)
    assert "constant 1e-08 rounds to 0 in float16" in str(caught.value)


def test_constant_message_shows_full_precision() -> None:
    policy = policy_text("{scheme: constant, val: 0.1}")
    model = nn.Linear(4, 4)
    initrules.apply(model, policy, seed=0)
    with torch.no_grad():
        model.weight[0, 0] = torch.nextafter(torch.tensor(0.1), torch.tensor(1.0))
    failures = initrules.check(model, policy).failures
    assert len(failures) == 1
    assert "1 of 16 values differ" in failures[0].message


def test_default_scheme_skips_scale_check() -> None:
    # torch's own LSTM init scales by hidden_size, far from sqrt(2 / fan_in).
    policy = initrules.load_policy(text="rules:\n  - {match: {}, init: default}\n")
    assert initrules.apply(nn.LSTM(4096, 8), policy, seed=0).ok


def test_expect_rejects_nan_bound() -> None:
    text = (
        "rules:\n"
        "  - match: {param: weight}\n"
        "    init: zeros\n"
        "    expect: {std: [.nan, 1.0]}\n"
    )
    with pytest.raises(initrules.PolicyError):
        initrules.load_policy(text=text)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_narrow_dtype_std_error_caught(dtype: torch.dtype) -> None:
    # Rounding to a narrow dtype barely moves the std of 4M values, so a 2%
    # error must not hide behind the dtype's epsilon.
    policy = policy_text("{scheme: normal, std: 0.02}")
    model = nn.Linear(2048, 2048).to(dtype)
    initrules.apply(model, policy, seed=0)
    with torch.no_grad():
        model.weight.mul_(1.02)
    checks = [failure.check for failure in initrules.check(model, policy).failures]
    assert "statistics" in checks
