"""Policies applied to `torch.nn` built-in modules.

For each module: every parameter is matched, each tensor gets the scheme its rule
names, and the values have the statistics of that scheme. Statistical tolerances are
five standard errors of a normal sample's standard deviation, which is a looser bound
for the uniform and truncated draws.
"""

import math
import textwrap
from collections.abc import Callable

import pytest
import torch
from torch import nn

import initrules


def load(text: str) -> initrules.Policy:
    return initrules.load_policy(text=textwrap.dedent(text))


def std_tolerance(expected: float, numel: int) -> float:
    return 5 * expected / math.sqrt(2 * numel)


def schemes_by_name(report: initrules.Report) -> dict[str, str]:
    return {row.name: row.scheme for row in report.rows}


def xavier_std(weight: torch.Tensor) -> float:
    fan_out, fan_in = weight.shape[0], weight.shape[1]
    return math.sqrt(2.0 / (fan_in + fan_out))


# --- nn.Transformer -----------------------------------------------------------

TRANSFORMER_POLICY = """\
rules:
  - name: attention input projections
    match: {module: MultiheadAttention, param: in_proj_weight}
    init: xavier_uniform
  - name: linear weights
    match: {module: Linear, param: weight}
    init: xavier_normal
  - match: {module: LayerNorm, param: weight}
    init: ones
  - match: {param: "*bias"}
    init: zeros
"""


def expected_transformer_scheme(name: str) -> str:
    local = name.rsplit(".", 1)[-1]
    if local == "in_proj_weight":
        return "xavier_uniform"
    if local.endswith("bias"):
        return "zeros"
    if ".norm" in name or name.startswith("norm"):
        return "ones"
    return "xavier_normal"


@pytest.fixture(scope="module")
def transformer() -> tuple[nn.Transformer, initrules.Report]:
    model = nn.Transformer(
        d_model=32,
        nhead=4,
        num_encoder_layers=1,
        num_decoder_layers=1,
        dim_feedforward=64,
        batch_first=True,
    )
    return model, initrules.apply(model, load(TRANSFORMER_POLICY), seed=0)


def test_transformer_has_no_unmatched(
    transformer: tuple[nn.Transformer, initrules.Report],
) -> None:
    model, report = transformer

    assert report.unmatched == []
    assert len(report.rows) == len(list(model.parameters()))


def test_transformer_schemes_per_tensor(
    transformer: tuple[nn.Transformer, initrules.Report],
) -> None:
    model, report = transformer

    expected = {
        name: expected_transformer_scheme(name) for name, _ in model.named_parameters()
    }
    assert schemes_by_name(report) == expected


def test_transformer_constant_tensors(
    transformer: tuple[nn.Transformer, initrules.Report],
) -> None:
    model, _ = transformer

    wrong = [
        name
        for name, param in model.named_parameters()
        if expected_transformer_scheme(name) in ("zeros", "ones")
        and not torch.equal(
            param, torch.full_like(param, float(name.endswith("weight")))
        )
    ]
    assert wrong == []


def test_transformer_xavier_statistics(
    transformer: tuple[nn.Transformer, initrules.Report],
) -> None:
    model, _ = transformer

    off = []
    for name, param in model.named_parameters():
        if not expected_transformer_scheme(name).startswith("xavier"):
            continue
        expected = xavier_std(param)
        std = param.std().item()
        if abs(std - expected) > std_tolerance(expected, param.numel()):
            off.append(f"{name}: std {std:.4g}, expected {expected:.4g}")
    assert off == []


def test_transformer_xavier_uniform_bound(
    transformer: tuple[nn.Transformer, initrules.Report],
) -> None:
    model, _ = transformer

    weight = model.encoder.layers[0].self_attn.in_proj_weight
    bound = math.sqrt(3) * xavier_std(weight)
    largest = weight.abs().max().item()
    assert largest <= bound, f"|w| reaches {largest:.4g}, bound {bound:.4g}"


# --- nn.MultiheadAttention ----------------------------------------------------

MHA_POLICY = """\
on_unmatched: {mode}
rules:
  - match: {{module: MultiheadAttention, param: in_proj_weight}}
    init: xavier_uniform
  - match: {{module: Linear, exact: {exact}, param: weight}}
    init: {{scheme: normal, std: 0.05}}
  - match: {{param: in_proj_bias}}
    init: {{scheme: constant, val: 0.25}}
  - match: {{param: bias}}
    init: zeros
"""


@pytest.fixture(scope="module")
def attention() -> tuple[nn.MultiheadAttention, initrules.Report]:
    model = nn.MultiheadAttention(64, 4)
    policy = load(MHA_POLICY.format(mode="error", exact="false"))
    return model, initrules.apply(model, policy, seed=0)


def test_attention_has_no_unmatched(
    attention: tuple[nn.MultiheadAttention, initrules.Report],
) -> None:
    _, report = attention

    assert report.unmatched == []


def test_attention_schemes_per_tensor(
    attention: tuple[nn.MultiheadAttention, initrules.Report],
) -> None:
    _, report = attention

    assert schemes_by_name(report) == {
        "in_proj_weight": "xavier_uniform",
        "in_proj_bias": "constant",
        "out_proj.weight": "normal",
        "out_proj.bias": "zeros",
    }


def test_attention_owner_types(
    attention: tuple[nn.MultiheadAttention, initrules.Report],
) -> None:
    _, report = attention

    owners = {row.name: row.module_type for row in report.rows}
    assert owners["in_proj_weight"] == "MultiheadAttention"
    assert owners["out_proj.weight"] == "NonDynamicallyQuantizableLinear"


def test_attention_statistics(
    attention: tuple[nn.MultiheadAttention, initrules.Report],
) -> None:
    model, _ = attention

    in_std = model.in_proj_weight.std().item()
    in_expected = xavier_std(model.in_proj_weight)
    out_std = model.out_proj.weight.std().item()
    assert abs(in_std - in_expected) <= std_tolerance(
        in_expected, model.in_proj_weight.numel()
    ), f"in_proj_weight std {in_std:.4g}, expected {in_expected:.4g}"
    assert abs(out_std - 0.05) <= std_tolerance(0.05, model.out_proj.weight.numel()), (
        f"out_proj.weight std {out_std:.4g}, expected 0.05"
    )
    assert torch.equal(model.in_proj_bias, torch.full((192,), 0.25))
    assert torch.equal(model.out_proj.bias, torch.zeros(64))


def test_exact_linear_skips_out_proj_subclass() -> None:
    model = nn.MultiheadAttention(16, 2)
    weight = model.out_proj.weight.clone()
    policy = load(MHA_POLICY.format(mode="keep", exact="true"))

    report = initrules.apply(model, policy, seed=0)

    assert report.unmatched == ["out_proj.weight"]
    assert torch.equal(model.out_proj.weight, weight)


# --- nn.LSTM ------------------------------------------------------------------

LSTM_POLICY = """\
rules:
  - match: {module: LSTM, param: "weight_ih_l*"}
    init: xavier_uniform
  - match: {module: LSTM, param: "weight_hh_l*"}
    init: orthogonal
  - match: {param: "bias_ih_l*"}
    init: zeros
  - match: {param: "bias_hh_l*"}
    init: ones
"""


@pytest.fixture(scope="module")
def lstm() -> tuple[nn.LSTM, initrules.Report]:
    model = nn.LSTM(16, 32, num_layers=2, bidirectional=True)
    return model, initrules.apply(model, load(LSTM_POLICY), seed=0)


def lstm_scheme(name: str) -> str:
    prefix = name.rsplit("_l", 1)[0]
    return {
        "weight_ih": "xavier_uniform",
        "weight_hh": "orthogonal",
        "bias_ih": "zeros",
        "bias_hh": "ones",
    }[prefix]


def test_lstm_has_no_unmatched(lstm: tuple[nn.LSTM, initrules.Report]) -> None:
    _, report = lstm

    assert report.unmatched == []


def test_lstm_schemes_per_tensor(lstm: tuple[nn.LSTM, initrules.Report]) -> None:
    model, report = lstm

    expected = {name: lstm_scheme(name) for name, _ in model.named_parameters()}
    assert "weight_hh_l1_reverse" in expected
    assert schemes_by_name(report) == expected


def test_lstm_recurrent_weights_are_orthonormal(
    lstm: tuple[nn.LSTM, initrules.Report],
) -> None:
    model, _ = lstm

    errors = {}
    for name, param in model.named_parameters():
        if name.startswith("weight_hh"):
            # Shape (4 * hidden, hidden): the columns are orthonormal.
            gram = param.T @ param
            errors[name] = (gram - torch.eye(param.shape[1])).abs().max().item()
    bad = {name: error for name, error in errors.items() if error > 1e-5}
    assert len(errors) == 4
    assert bad == {}


def test_lstm_input_weights_xavier_std(lstm: tuple[nn.LSTM, initrules.Report]) -> None:
    model, _ = lstm

    off = []
    for name, param in model.named_parameters():
        if name.startswith("weight_ih"):
            expected = xavier_std(param)
            std = param.std().item()
            if abs(std - expected) > std_tolerance(expected, param.numel()):
                off.append(f"{name}: std {std:.4g}, expected {expected:.4g}")
    assert off == []


def test_lstm_biases(lstm: tuple[nn.LSTM, initrules.Report]) -> None:
    model, _ = lstm

    wrong = [
        name
        for name, param in model.named_parameters()
        if name.startswith("bias")
        and not torch.equal(param, torch.full_like(param, float("hh" in name)))
    ]
    assert wrong == []


# --- nn.Conv2d and nn.ConvTranspose2d -----------------------------------------

CONV_POLICY = """\
rules:
  - match: {module: "Conv*d", param: weight}
    init: {scheme: kaiming_normal, mode: fan_out, nonlinearity: relu}
  - match: {param: bias}
    init: zeros
"""

# torch's fan_out is dim 0 times the receptive field, for transposed convolutions too.
# Their weight has shape (in_channels, out_channels / groups, kH, kW).
CONVOLUTIONS: dict[str, tuple[Callable[[], nn.Module], int]] = {
    "conv2d": (lambda: nn.Conv2d(32, 64, 3), 64 * 9),
    "conv2d-groups": (lambda: nn.Conv2d(32, 64, 3, groups=4), 64 * 9),
    "conv2d-rectangular-kernel": (lambda: nn.Conv2d(48, 32, (3, 5)), 32 * 15),
    "conv-transpose2d": (lambda: nn.ConvTranspose2d(32, 64, 3), 32 * 9),
}


@pytest.mark.parametrize("case", list(CONVOLUTIONS), ids=list(CONVOLUTIONS))
def test_conv_kaiming_fan_out(case: str) -> None:
    build, fan_out = CONVOLUTIONS[case]
    model = build()

    report = initrules.apply(model, load(CONV_POLICY), seed=0)

    weight = model.weight.detach()
    expected = math.sqrt(2.0) / math.sqrt(fan_out)
    std = weight.std().item()
    mean = weight.mean().item()
    assert report.unmatched == []
    assert schemes_by_name(report) == {"weight": "kaiming_normal", "bias": "zeros"}
    assert abs(std - expected) <= std_tolerance(expected, weight.numel()), (
        f"std {std:.5g}, expected {expected:.5g}"
    )
    assert abs(mean) <= 5 * expected / math.sqrt(weight.numel()), f"mean {mean:.3g}"
    assert torch.equal(model.bias, torch.zeros_like(model.bias))


# --- nn.BatchNorm2d -----------------------------------------------------------

BATCHNORM_POLICY = """\
rules:
  - match: {module: BatchNorm2d, param: weight}
    init: ones
  - match: {param: bias}
    init: zeros
"""


@pytest.fixture(scope="module")
def batchnorm() -> tuple[nn.BatchNorm2d, dict[str, torch.Tensor], initrules.Report]:
    model = nn.BatchNorm2d(8)
    # Values unlike the defaults, so that a reset would show.
    with torch.no_grad():
        model.weight.fill_(3.0)
        model.bias.fill_(-1.0)
        model.running_mean.uniform_(-1.0, 1.0)
        model.running_var.uniform_(0.5, 2.0)
        model.num_batches_tracked.fill_(17)
    buffers = {name: value.clone() for name, value in model.named_buffers()}
    return model, buffers, initrules.apply(model, load(BATCHNORM_POLICY), seed=0)


def test_batchnorm_has_no_unmatched(
    batchnorm: tuple[nn.BatchNorm2d, dict[str, torch.Tensor], initrules.Report],
) -> None:
    _, _, report = batchnorm

    assert report.unmatched == []
    assert schemes_by_name(report) == {"weight": "ones", "bias": "zeros"}


def test_batchnorm_affine_values(
    batchnorm: tuple[nn.BatchNorm2d, dict[str, torch.Tensor], initrules.Report],
) -> None:
    model, _, _ = batchnorm

    assert torch.equal(model.weight, torch.ones(8))
    assert torch.equal(model.bias, torch.zeros(8))


def test_batchnorm_buffers_listed_and_untouched(
    batchnorm: tuple[nn.BatchNorm2d, dict[str, torch.Tensor], initrules.Report],
) -> None:
    model, buffers, report = batchnorm

    changed = [
        name
        for name, value in model.named_buffers()
        if not torch.equal(value, buffers[name])
    ]
    assert report.untouched_buffers == [
        "running_mean",
        "running_var",
        "num_batches_tracked",
    ]
    assert changed == []


# --- nn.Embedding with padding_idx --------------------------------------------

EMBEDDING_POLICY = """\
rules:
  - match: {module: Embedding}
    init: {scheme: normal, std: 1.0}
"""

# Each case maps to (extra rule line, whether the padding row ends up zero, note).
PADDING_CASES = {
    "default": ("", True, "padding row 3 zeroed"),
    "zero_padding_idx-true": (
        "    zero_padding_idx: true\n",
        True,
        "padding row 3 zeroed",
    ),
    "zero_padding_idx-false": ("    zero_padding_idx: false\n", False, ""),
}


def embedding_with_padding(extra: str) -> tuple[nn.Embedding, initrules.Report]:
    model = nn.Embedding(400, 64, padding_idx=3)
    report = initrules.apply(model, load(EMBEDDING_POLICY + extra), seed=0)
    return model, report


@pytest.mark.parametrize("case", list(PADDING_CASES), ids=list(PADDING_CASES))
def test_embedding_padding_row(case: str) -> None:
    extra, zeroed, note = PADDING_CASES[case]

    model, report = embedding_with_padding(extra)

    padding_is_zero = bool((model.weight[3] == 0).all())
    assert report.unmatched == []
    assert report.row("weight").scheme == "normal"
    assert padding_is_zero == zeroed, f"padding row: {model.weight[3].tolist()}"
    assert report.row("weight").note == note


@pytest.mark.parametrize("case", list(PADDING_CASES), ids=list(PADDING_CASES))
def test_embedding_other_rows_are_normal(case: str) -> None:
    extra, _, _ = PADDING_CASES[case]

    model, _ = embedding_with_padding(extra)

    others = torch.cat([model.weight[:3], model.weight[4:]]).detach()
    std = others.std().item()
    zero_rows = int((others == 0).all(dim=1).sum())
    assert abs(std - 1.0) <= std_tolerance(1.0, others.numel()), f"std {std:.4g}"
    assert zero_rows == 0
