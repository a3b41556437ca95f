"""Test block-by-block ("chunks") initialization and the module's true fans.

Each test applies a real policy to real torch.nn modules (and to
transformers' Conv1D): MultiheadAttention's fused and separate projections,
the stacked gates of LSTM and GRU, grouped, strided, depthwise and transposed
convolutions. Measured stds are compared with the std the scheme implies,
within SIGMAS standard errors of the sample std (see ``std_z_score``).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import initrules
from initrules import PlanError, PolicyError, load_policy

REPO_ROOT = Path(__file__).resolve().parents[1]
LSTM_POLICY = REPO_ROOT / "policies" / "lstm.yaml"

# A measured std passes when it lies within SIGMAS standard errors of the
# expected std. The smallest tensor measured here is the LSTM's (24, 64)
# projection, with a tolerance of 6 * sqrt(0.2 / 1536) = 6.8 % of the std for
# a uniform draw. The pooled normal draws have at least 8,192 elements, so
# theirs is at most 6 / sqrt(2 * 8192) = 4.7 %. The wrong fans that these
# tests guard against change the std by 18 % or more. Where a test has a
# wrong convention at hand, it asserts that the check would reject it.
SIGMAS = 6.0
NORMAL_KURTOSIS = 3.0
UNIFORM_KURTOSIS = 9.0 / 5.0

# Gram matrices of float32 orthogonal blocks are compared with the identity
# in float64. Each entry sums at most 64 products of float32 values, each
# rounded by half an epsilon (6e-8), so 1e-5 leaves a wide margin. The
# measured error is about 6e-7.
ORTHOGONAL_ATOL = 1e-5

# torch stacks an LSTM's gates along dim 0 as input, forget, cell, output,
# and a GRU's as reset, update, new.
LSTM_GATES = 4
LSTM_FORGET = 1
GRU_GATES = 3
GRU_UPDATE = 1

RNN_INPUT = 48
RNN_HIDDEN = 64
LSTM_PROJ = 24


def std_z_score(values: torch.Tensor, expected_std: float, kurtosis: float) -> float:
    """Return how many standard errors the sample std of ``values`` is off.

    For n independent draws with kurtosis k and large n, var(s^2) is
    (k - 1) * std^4 / n. By the delta method, the standard error of s is then
    std * sqrt((k - 1) / (4 n)). That is std / sqrt(2 n) for a normal and
    std * sqrt(0.2 / n) for a uniform.
    """
    flat = values.detach().double().flatten()
    standard_error = expected_std * math.sqrt((kurtosis - 1.0) / (4 * flat.numel()))
    return (flat.std().item() - expected_std) / standard_error


def xavier_std(fan_in: int, fan_out: int) -> float:
    return math.sqrt(2.0 / (fan_in + fan_out))


def kaiming_relu_std(fan: int) -> float:
    return math.sqrt(2.0) / math.sqrt(fan)


def gram_error(matrix: torch.Tensor) -> float:
    """Return the largest deviation of the smaller Gram matrix from the identity.

    A matrix with orthonormal rows (wide) or columns (tall) gives about 0.
    """
    values = matrix.detach().double()
    rows, columns = values.shape
    gram = values @ values.T if rows <= columns else values.T @ values
    identity = torch.eye(gram.shape[0], dtype=gram.dtype)
    return (gram - identity).abs().max().item()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copy the bytes of every parameter and buffer of ``model``, by name."""
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(model.named_buffers(remove_duplicate=False))
    return {
        name: tensor.detach().clone().contiguous().view(-1).view(torch.uint8)
        for name, tensor in named.items()
    }


def changed_tensors(model: nn.Module, before: dict[str, torch.Tensor]) -> list[str]:
    """Return the names whose bytes differ from ``before``, or that appeared or left."""
    after = snapshot(model)
    names = sorted(before.keys() | after.keys())
    return [
        name
        for name in names
        if name not in before
        or name not in after
        or not torch.equal(before[name], after[name])
    ]


def seeded_inputs(*shape: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(*shape, generator=generator)


def test_snapshot_detects_one_changed_bit() -> None:
    model = nn.Linear(4, 3)
    before = snapshot(model)
    assert changed_tensors(model, before) == []

    with torch.no_grad():
        value = model.weight[1, 2]
        model.weight[1, 2] = torch.nextafter(value, value + 1)
    assert changed_tensors(model, before) == ["weight"]


# MultiheadAttention

EMBED = 256
HEADS = 8


def attention_policy(init: str) -> str:
    return (
        "rules:\n"
        "  - name: fused projections\n"
        "    match: {module: MultiheadAttention, param: in_proj_weight}\n"
        f"    init: {init}\n"
        "  - match: {param: weight}\n"
        "    init: xavier_uniform\n"
        "  - match: {param: '*bias'}\n"
        "    init: zeros\n"
    )


@pytest.mark.parametrize("fans", ["torch", "module"])
def test_attention_chunks_get_separate_xavier(fans: str) -> None:
    attention = nn.MultiheadAttention(EMBED, HEADS)
    policy = load_policy(
        text=attention_policy(f"{{scheme: xavier_uniform, chunks: 3, fans: {fans}}}")
    )
    report = initrules.apply(attention, policy, seed=0)

    # Each of q, k and v is an E x E matrix with fans (E, E).
    expected = xavier_std(EMBED, EMBED)
    stacked = xavier_std(EMBED, 3 * EMBED)
    blocks = attention.in_proj_weight.detach().chunk(3, dim=0)
    for index, block in enumerate(blocks):
        z_score = std_z_score(block, expected, UNIFORM_KURTOSIS)
        assert abs(z_score) < SIGMAS, f"block {index}: {z_score:.1f} standard errors"
        bound = math.sqrt(3.0) * expected
        assert block.abs().max().item() <= bound * (1 + 1e-6), f"block {index}"
        # The stacked tensor's std is 29 % lower, far outside the tolerance.
        z_stacked = std_z_score(block, stacked, UNIFORM_KURTOSIS)
        assert z_stacked > SIGMAS, f"block {index}"

    rows = report.rows_of("in_proj_weight")
    assert [row.chunk for row in rows] == [(0, 3, 0), (1, 3, 0), (2, 3, 0)]
    for row in rows:
        assert row.shape == (EMBED, EMBED)
        assert row.rule_name == "fused projections"
        assert row.expected_std == pytest.approx(expected)
        assert row.args["fans"] == fans
        if fans == "module":
            assert row.args["fan_in"] == EMBED
            assert row.args["fan_out"] == EMBED
        else:
            assert row.args["fan_in"] is None
            assert row.args["fan_out"] is None


def test_attention_without_chunks_gets_stacked_std() -> None:
    attention = nn.MultiheadAttention(EMBED, HEADS)
    report = initrules.apply(
        attention, load_policy(text=attention_policy("xavier_uniform")), seed=0
    )

    # One (3E, E) matrix: fan_in E, fan_out 3E.
    stacked = xavier_std(EMBED, 3 * EMBED)
    separate = xavier_std(EMBED, EMBED)
    for index, block in enumerate(attention.in_proj_weight.detach().chunk(3)):
        z_stacked = std_z_score(block, stacked, UNIFORM_KURTOSIS)
        assert abs(z_stacked) < SIGMAS, f"block {index}"
        # The check in test_attention_chunks_get_separate_xavier rejects it.
        z_separate = std_z_score(block, separate, UNIFORM_KURTOSIS)
        assert abs(z_separate) > SIGMAS, f"block {index}"

    rows = report.rows_of("in_proj_weight")
    assert len(rows) == 1
    assert rows[0].chunk is None
    assert rows[0].shape == (3 * EMBED, EMBED)
    assert rows[0].expected_std == pytest.approx(stacked)


def test_attention_separate_projections_by_glob() -> None:
    key_dim, value_dim = 96, 160
    attention = nn.MultiheadAttention(EMBED, HEADS, kdim=key_dim, vdim=value_dim)
    assert attention.in_proj_weight is None
    policy = load_policy(
        text=(
            "rules:\n"
            "  - name: separate projections\n"
            "    match: {module: MultiheadAttention, param: '?_proj_weight'}\n"
            "    init: {scheme: xavier_uniform, fans: module}\n"
            "  - match: {param: weight}\n"
            "    init: xavier_uniform\n"
            "  - match: {param: '*bias'}\n"
            "    init: zeros\n"
        )
    )
    report = initrules.apply(attention, policy, seed=0)

    assert report.unmatched == []
    for name, in_features in [
        ("q_proj_weight", EMBED),
        ("k_proj_weight", key_dim),
        ("v_proj_weight", value_dim),
    ]:
        weight = getattr(attention, name)
        assert tuple(weight.shape) == (EMBED, in_features)
        expected = xavier_std(in_features, EMBED)
        z_score = std_z_score(weight, expected, UNIFORM_KURTOSIS)
        assert abs(z_score) < SIGMAS, f"{name}: {z_score:.1f} standard errors"

        rows = report.rows_of(name)
        assert len(rows) == 1, name
        assert rows[0].chunk is None, name
        assert rows[0].rule_name == "separate projections", name
        assert rows[0].expected_std == pytest.approx(expected), name
        assert rows[0].args["fan_in"] == in_features, name
        assert rows[0].args["fan_out"] == EMBED, name

    query = seeded_inputs(5, 2, EMBED)
    key = seeded_inputs(7, 2, key_dim)
    value = seeded_inputs(7, 2, value_dim)
    output, _ = attention(query, key, value)
    assert output.shape == (5, 2, EMBED)
    assert torch.isfinite(output).all()


# LSTM and GRU

LSTM_OPTIONS = [
    pytest.param({}, id="single-layer"),
    pytest.param(
        {"num_layers": 2, "bidirectional": True}, id="two-layers-bidirectional"
    ),
    pytest.param({"proj_size": LSTM_PROJ}, id="projection"),
]


def layer_suffixes(rnn: nn.RNNBase) -> list[str]:
    directions = ["", "_reverse"] if rnn.bidirectional else [""]
    return [f"_l{layer}{d}" for layer in range(rnn.num_layers) for d in directions]


@pytest.mark.parametrize("options", LSTM_OPTIONS)
def test_lstm_policy_gates(options: dict[str, int]) -> None:
    lstm = nn.LSTM(RNN_INPUT, RNN_HIDDEN, **options)
    report = initrules.apply(lstm, LSTM_POLICY, seed=0)

    assert report.unmatched == []
    assert report.ok
    hidden = RNN_HIDDEN
    for suffix in layer_suffixes(lstm):
        recurrent = getattr(lstm, f"weight_hh{suffix}").detach()
        # With proj_size, each gate's block is (hidden, proj_size), a tall
        # matrix with orthonormal columns.
        gates = recurrent.chunk(LSTM_GATES, dim=0)
        for gate, block in enumerate(gates):
            assert gram_error(block) < ORTHOGONAL_ATOL, f"weight_hh{suffix} gate {gate}"
        # Four orthonormal blocks stacked: W^T W is 4 I, so W is not orthogonal.
        assert gram_error(recurrent) > 1.0, f"weight_hh{suffix}"
        columns = recurrent.shape[1]
        stacked_gram = recurrent.double().T @ recurrent.double()
        four_identity = LSTM_GATES * torch.eye(columns, dtype=torch.float64)
        assert torch.allclose(stacked_gram, four_identity, atol=4 * ORTHOGONAL_ATOL)

        inputs = getattr(lstm, f"weight_ih{suffix}").detach()
        in_features = inputs.shape[1]
        expected = xavier_std(in_features, hidden)
        for gate, block in enumerate(inputs.chunk(LSTM_GATES, dim=0)):
            z_score = std_z_score(block, expected, UNIFORM_KURTOSIS)
            assert abs(z_score) < SIGMAS, f"weight_ih{suffix} gate {gate}: {z_score}"

        input_bias = getattr(lstm, f"bias_ih{suffix}").detach()
        hidden_bias = getattr(lstm, f"bias_hh{suffix}").detach()
        effective = input_bias + hidden_bias
        for gate, block in enumerate(effective.chunk(LSTM_GATES)):
            value = 1.0 if gate == LSTM_FORGET else 0.0
            assert torch.equal(block, torch.full((hidden,), value)), f"gate {gate}"

    if lstm.proj_size:
        projection = lstm.weight_hr_l0
        assert tuple(projection.shape) == (LSTM_PROJ, hidden)
        z_score = std_z_score(
            projection, xavier_std(hidden, LSTM_PROJ), UNIFORM_KURTOSIS
        )
        assert abs(z_score) < SIGMAS

    rows = report.rows_of("weight_hh_l0")
    assert [row.chunk for row in rows] == [(i, 4, 0) for i in range(LSTM_GATES)]
    assert {row.rule_name for row in rows} == {"recurrent weights"}
    bias_rules = [row.rule_name for row in report.rows_of("bias_ih_l0")]
    assert bias_rules == [
        "other biases",
        "forget gate bias",
        "other biases",
        "other biases",
    ]

    sequence = seeded_inputs(5, 3, RNN_INPUT)
    with warnings.catch_warnings():
        # torch 2.13's CPU build warns that oneDNN has no LSTM with projections.
        warnings.filterwarnings("ignore", "LSTM with projections", UserWarning)
        output, (state, cell) = lstm(sequence)
    directions = 2 if lstm.bidirectional else 1
    out_features = lstm.proj_size or hidden
    assert output.shape == (5, 3, directions * out_features)
    assert state.shape == (directions * lstm.num_layers, 3, out_features)
    assert torch.isfinite(output).all()
    assert torch.isfinite(cell).all()


def test_lstm_whole_tensor_orthogonal_differs() -> None:
    # Without chunks the stacked (4H, H) tensor has orthonormal columns, so
    # its gate blocks do not, and the per-gate check above would fail.
    lstm = nn.LSTM(RNN_INPUT, RNN_HIDDEN)
    policy = load_policy(
        text=(
            "rules:\n"
            "  - match: {param: 'weight_hh_l*'}\n"
            "    init: orthogonal\n"
            "  - match: {param: 'weight_ih_l*'}\n"
            "    init: xavier_uniform\n"
            "  - match: {param: 'bias_*'}\n"
            "    init: zeros\n"
        )
    )
    initrules.apply(lstm, policy, seed=0)

    recurrent = lstm.weight_hh_l0.detach()
    assert gram_error(recurrent) < ORTHOGONAL_ATOL
    for gate, block in enumerate(recurrent.chunk(LSTM_GATES)):
        assert gram_error(block) > 0.1, f"gate {gate}"


GRU_POLICY = """\
rules:
  - name: recurrent weights
    match: {module: GRU, param: 'weight_hh_l*'}
    init: {scheme: orthogonal, chunks: 3}
  - name: input weights
    match: {module: GRU, param: 'weight_ih_l*'}
    init: {scheme: xavier_uniform, chunks: 3}
  - name: update gate bias
    match: {module: GRU, param: 'bias_hh_l*', chunk: [1, 3]}
    init: ones
  - name: other biases
    match: {module: GRU, param: 'bias_*'}
    init: zeros
"""


def test_gru_chunked_gates() -> None:
    gru = nn.GRU(RNN_INPUT, RNN_HIDDEN)
    report = initrules.apply(gru, load_policy(text=GRU_POLICY), seed=0)

    assert report.unmatched == []
    hidden = RNN_HIDDEN
    recurrent = gru.weight_hh_l0.detach()
    assert tuple(recurrent.shape) == (GRU_GATES * hidden, hidden)
    for gate, block in enumerate(recurrent.chunk(GRU_GATES)):
        assert gram_error(block) < ORTHOGONAL_ATOL, f"weight_hh_l0 gate {gate}"
    assert gram_error(recurrent) > 1.0

    expected = xavier_std(RNN_INPUT, hidden)
    for gate, block in enumerate(gru.weight_ih_l0.detach().chunk(GRU_GATES)):
        z_score = std_z_score(block, expected, UNIFORM_KURTOSIS)
        assert abs(z_score) < SIGMAS, f"weight_ih_l0 gate {gate}: {z_score:.1f}"

    for gate, block in enumerate(gru.bias_hh_l0.detach().chunk(GRU_GATES)):
        value = 1.0 if gate == GRU_UPDATE else 0.0
        assert torch.equal(block, torch.full((hidden,), value)), f"gate {gate}"
    assert torch.equal(gru.bias_ih_l0.detach(), torch.zeros(GRU_GATES * hidden))

    rows = report.rows_of("bias_hh_l0")
    assert [row.chunk for row in rows] == [(i, 3, 0) for i in range(GRU_GATES)]
    assert [row.rule_name for row in rows] == [
        "other biases",
        "update gate bias",
        "other biases",
    ]
    assert len(report.rows_of("bias_ih_l0")) == 1

    output, state = gru(seeded_inputs(5, 3, RNN_INPUT))
    assert output.shape == (5, 3, hidden)
    assert torch.equal(state[-1], output[-1])
    assert torch.isfinite(output).all()


# Errors


def two_blocks_rule(init: str) -> str:
    return (
        "rules:\n"
        "  - name: split\n"
        "    match: {param: weight}\n"
        f"    init: {init}\n"
        "  - match: {param: bias}\n"
        "    init: zeros\n"
    )


# Linear(4, 12) has a (12, 4) weight; each policy's rule 1 starts at line 2.
WEIGHT_PREFIX = (
    "rule 1 'split' at <text>:2:5 cannot initialize 'weight' (shape (12, 4), float32): "
)
MISSING_BLOCKS_HINT = (
    "; add a rule for the other chunks (a rule without 'chunk' takes every chunk left)"
)

PLAN_ERRORS = [
    pytest.param(
        two_blocks_rule("{scheme: xavier_uniform, chunks: 5}"),
        WEIGHT_PREFIX + "5 chunks do not divide dim 0 of size 12; use a chunk count "
        "that divides the size, or narrow the rule's match",
        id="chunks-not-dividing",
    ),
    pytest.param(
        two_blocks_rule("{scheme: xavier_uniform, chunks: 2, dim: 2}"),
        WEIGHT_PREFIX + "the rule splits dim 2, and the tensor has 2 dimension(s); "
        "choose a dim the tensor has",
        id="dim-out-of-range",
    ),
    pytest.param(
        "rules:\n"
        "  - name: split\n"
        "    match: {param: weight, chunk: [1, 4]}\n"
        "    init: ones\n"
        "  - match: {param: bias}\n"
        "    init: zeros\n",
        WEIGHT_PREFIX + "the rule splits the tensor into 4 chunks along dim 0, and "
        "no rule matches chunk(s) 0, 2, 3" + MISSING_BLOCKS_HINT,
        id="blocks-without-rule",
    ),
    pytest.param(
        "rules:\n"
        "  - name: split\n"
        "    match: {param: weight, chunk: [1, 4]}\n"
        "    init: ones\n"
        "  - match: {param: weight, chunk: [0, 4]}\n"
        "    init: zeros\n"
        "  - match: {param: bias}\n"
        "    init: zeros\n",
        WEIGHT_PREFIX + "the rule splits the tensor into 4 chunks along dim 0, and "
        "no rule matches chunk(s) 2, 3" + MISSING_BLOCKS_HINT,
        id="some-blocks-without-rule",
    ),
]


@pytest.mark.parametrize(("text", "message"), PLAN_ERRORS)
def test_chunk_plan_error_writes_nothing(text: str, message: str) -> None:
    model = nn.Linear(4, 12)
    before = snapshot(model)
    policy = load_policy(text=text)

    with pytest.raises(PlanError) as caught:
        initrules.apply(model, policy, seed=0)

    assert str(caught.value) == message
    assert changed_tensors(model, before) == []


POLICY_ERRORS = [
    pytest.param(
        "rules:\n  - match: {param: weight, chunk: [4, 4]}\n    init: ones\n",
        ":2:35: 'match.chunk' of rule 1: invalid chunk [4, 4]: expected [index, "
        "count] with count >= 2 and 0 <= index < count, such as [1, 4] for the "
        "second of four",
        id="chunk-index-out-of-range",
    ),
    pytest.param(
        "rules:\n  - match: {param: weight, chunk: [0, 1]}\n    init: ones\n",
        ":2:35: 'match.chunk' of rule 1: invalid chunk [0, 1]: expected [index, "
        "count] with count >= 2 and 0 <= index < count, such as [1, 4] for the "
        "second of four",
        id="chunk-count-one",
    ),
    pytest.param(
        "rules:\n"
        "  - match: {param: weight}\n"
        "    init: {scheme: xavier_uniform, dim: 1}\n",
        ":3:41: 'init.dim' of rule 1: 'dim' applies to 'chunks'; add 'chunks' or "
        "drop it, got {'dim': 1}",
        id="dim-without-chunks",
    ),
    pytest.param(
        "rules:\n  - match: {param: weight, chunk_dim: 1}\n    init: ones\n",
        ":2:12: 'match' of rule 1: 'chunk_dim' applies to 'chunk'; add 'chunk' or "
        "drop it",
        id="chunk-dim-without-chunk",
    ),
    pytest.param(
        "rules:\n"
        "  - match: {param: weight}\n"
        "    init: {scheme: kaiming_normal, fans: module, fan_in: 3}\n",
        ":3:11: 'init' of rule 1: give either fans: module or explicit "
        "fan_in/fan_out, not both",
        id="fans-module-with-fan-in",
    ),
]


@pytest.mark.parametrize(("text", "message"), POLICY_ERRORS)
def test_layout_policy_error(text: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as caught:
        load_policy(text=text)
    assert str(caught.value) == "<text>" + message

    path = tmp_path / "policy.yaml"
    path.write_text(text, encoding="utf-8")
    model = nn.Linear(4, 12)
    before = snapshot(model)
    with pytest.raises(PolicyError) as caught:
        initrules.apply(model, path, seed=0)
    assert str(caught.value) == f"{path}{message}"
    assert changed_tensors(model, before) == []


DEFAULT_BLOCK_PROBLEM = (
    "rule 1 'split' at <text>:2:5 cannot initialize 'weight' (shape (12, 4), "
    "float32): default initializes whole tensors and cannot fill chunks; use "
    "another scheme for the blocks, or do not split this tensor"
)


def test_default_scheme_rejects_chunks() -> None:
    model = nn.Linear(4, 12)
    before = snapshot(model)
    policy = load_policy(text=two_blocks_rule("{scheme: default, chunks: 2}"))

    with pytest.raises(PlanError) as caught:
        initrules.apply(model, policy, seed=0)

    # One tensor, one problem, whatever the number of blocks.
    assert str(caught.value) == DEFAULT_BLOCK_PROBLEM
    assert changed_tensors(model, before) == []


def test_fans_module_rejects_layer_norm() -> None:
    model = nn.LayerNorm(8)
    before = snapshot(model)
    policy = load_policy(
        text=(
            "rules:\n"
            "  - name: norm\n"
            "    match: {param: weight}\n"
            "    init: {scheme: kaiming_normal, fans: module}\n"
            "  - match: {param: bias}\n"
            "    init: zeros\n"
        )
    )

    with pytest.raises(PlanError) as caught:
        initrules.apply(model, policy, seed=0)

    assert str(caught.value) == (
        "rule 1 'norm' at <text>:2:5 cannot initialize 'weight' (shape (8,), "
        "float32): fans: module needs the weight of a module whose layout "
        "initrules recognizes (Linear, convolutions, transformers' Conv1D, "
        "MultiheadAttention, RNN/LSTM/GRU), and 'weight' of LayerNorm is not one; "
        "use fans: torch, or give fan_in and fan_out explicitly"
    )
    assert changed_tensors(model, before) == []


# Seeded streams


def test_seeded_blocks_repeat_and_differ() -> None:
    first = nn.LSTM(RNN_INPUT, RNN_HIDDEN, num_layers=2, bidirectional=True)
    second = nn.LSTM(RNN_INPUT, RNN_HIDDEN, num_layers=2, bidirectional=True)
    initrules.apply(first, LSTM_POLICY, seed=3)
    initrules.apply(second, LSTM_POLICY, seed=3)

    assert changed_tensors(second, snapshot(first)) == []

    # Identical blocks would mean that the blocks share one random stream.
    blocks = [
        *first.weight_hh_l0.detach().chunk(LSTM_GATES),
        *first.weight_hh_l0_reverse.detach().chunk(LSTM_GATES),
        *first.weight_ih_l0.detach().chunk(LSTM_GATES),
    ]
    for i in range(len(blocks)):
        for j in range(i + 1, len(blocks)):
            assert not torch.equal(blocks[i], blocks[j]), f"blocks {i} and {j}"

    other_seed = nn.LSTM(RNN_INPUT, RNN_HIDDEN, num_layers=2, bidirectional=True)
    initrules.apply(other_seed, LSTM_POLICY, seed=4)
    assert not torch.equal(other_seed.weight_hh_l0, first.weight_hh_l0)


# A block of 700 x 1600 = 1,120,000 elements is larger than the 2**20 elements
# that the seeded stream draws in one piece. It is drawn in two pieces, which
# run in parallel when torch has two threads.
LARGE_BLOCK = (700, 1600)


@pytest.mark.parametrize("dim", [0, 1])
def test_large_blocks_same_on_any_thread_count(dim: int) -> None:
    rows, columns = LARGE_BLOCK
    shape = (3 * rows, columns) if dim == 0 else (columns, 3 * rows)
    policy = load_policy(
        text=two_blocks_rule(f"{{scheme: xavier_uniform, chunks: 3, dim: {dim}}}")
    )

    threads = torch.get_num_threads()
    weights = {}
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            model = nn.Linear(shape[1], shape[0])
            report = initrules.apply(model, policy, seed=11)
            weights[count] = model.weight.detach()
    finally:
        torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads

    assert torch.equal(weights[1], weights[2])
    blocks = weights[1].chunk(3, dim=dim)
    assert blocks[0].numel() > 2**20
    for i, j in [(0, 1), (0, 2), (1, 2)]:
        assert not torch.equal(blocks[i], blocks[j]), f"blocks {i} and {j}"

    block_shape = LARGE_BLOCK if dim == 0 else (columns, rows)
    expected = xavier_std(block_shape[1], block_shape[0])
    for index, block in enumerate(blocks):
        z_score = std_z_score(block, expected, UNIFORM_KURTOSIS)
        assert abs(z_score) < SIGMAS, f"block {index}: {z_score:.1f}"
    rows_of_weight = report.rows_of("weight")
    assert [row.chunk for row in rows_of_weight] == [(i, 3, dim) for i in range(3)]
    assert {row.shape for row in rows_of_weight} == {block_shape}


# Fans


def build_conv1d() -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    # nf=48 outputs, nx=32 inputs: the weight is stored as (32, 48).
    return Conv1D(48, 32)


# (factory, true fans by initrules/fans.py's table, torch's fans). k is the
# product of the kernel sizes and s of the strides.
FAN_CASES = [
    pytest.param(
        lambda: nn.ConvTranspose2d(8, 6, 3, stride=2, groups=2),
        # in / groups * k / s = 4 * 9 / 4, out / groups * k = 3 * 9
        (9, 27),
        # the (8, 3, 3, 3) weight: dim 1 * k, dim 0 * k
        (27, 72),
        id="conv-transpose",
    ),
    pytest.param(
        lambda: nn.Conv2d(8, 16, 3, groups=4),
        # in / groups * k = 2 * 9, out / groups * k / s = 4 * 9 / 1
        (18, 36),
        (18, 144),
        id="grouped-conv",
    ),
    pytest.param(
        lambda: nn.Conv2d(8, 8, 4, stride=2, padding=1, groups=8),
        # in / groups * k = 1 * 16, out / groups * k / s = 1 * 16 / 4
        (16, 4),
        (16, 128),
        id="depthwise-conv",
    ),
    pytest.param(build_conv1d, (32, 48), (48, 32), id="transformers-conv1d"),
]

# The fan tests pool this many copies of one small module, so that the
# measured std has at least 8,192 elements.
COPIES = 64


def fans_policy(mode: str, fans: str) -> str:
    return (
        "rules:\n"
        "  - name: weights\n"
        "    match: {param: weight}\n"
        f"    init: {{scheme: kaiming_normal, mode: {mode}, nonlinearity: relu, "
        f"fans: {fans}}}\n"
        "  - match: {param: bias}\n"
        "    init: zeros\n"
    )


def pooled_weights(copies: nn.ModuleList) -> torch.Tensor:
    return torch.cat([module.weight.detach().flatten() for module in copies])


@pytest.mark.parametrize("mode", ["fan_in", "fan_out"])
@pytest.mark.parametrize(("factory", "true_fans", "torch_fans"), FAN_CASES)
def test_fans_module_uses_true_fans(
    factory: Callable[[], nn.Module],
    true_fans: tuple[int, int],
    torch_fans: tuple[int, int],
    mode: str,
) -> None:
    copies = nn.ModuleList(factory() for _ in range(COPIES))
    report = initrules.apply(
        copies, load_policy(text=fans_policy(mode, "module")), seed=0
    )

    row = report.row("0.weight")
    assert row.args["fans"] == "module"
    assert row.args["fan_in"] == true_fans[0]
    assert row.args["fan_out"] == true_fans[1]

    position = 0 if mode == "fan_in" else 1
    expected = kaiming_relu_std(true_fans[position])
    assert row.expected_std == pytest.approx(expected)
    values = pooled_weights(copies)
    z_score = std_z_score(values, expected, NORMAL_KURTOSIS)
    assert abs(z_score) < SIGMAS, f"{z_score:.1f} standard errors"
    if torch_fans[position] != true_fans[position]:
        torch_std = kaiming_relu_std(torch_fans[position])
        assert abs(std_z_score(values, torch_std, NORMAL_KURTOSIS)) > SIGMAS


@pytest.mark.parametrize("mode", ["fan_in", "fan_out"])
@pytest.mark.parametrize(("factory", "true_fans", "torch_fans"), FAN_CASES)
def test_fans_torch_uses_shape(
    factory: Callable[[], nn.Module],
    true_fans: tuple[int, int],
    torch_fans: tuple[int, int],
    mode: str,
) -> None:
    copies = nn.ModuleList(factory() for _ in range(COPIES))
    report = initrules.apply(
        copies, load_policy(text=fans_policy(mode, "torch")), seed=0
    )

    fans = nn.init._calculate_fan_in_and_fan_out(copies[0].weight)
    assert fans == torch_fans
    row = report.row("0.weight")
    assert row.args["fans"] == "torch"
    assert row.args["fan_in"] is None
    assert row.args["fan_out"] is None

    position = 0 if mode == "fan_in" else 1
    expected = kaiming_relu_std(torch_fans[position])
    assert row.expected_std == pytest.approx(expected)
    values = pooled_weights(copies)
    z_score = std_z_score(values, expected, NORMAL_KURTOSIS)
    assert abs(z_score) < SIGMAS, f"{z_score:.1f} standard errors"


def test_explicit_fan_in_sets_std() -> None:
    model = nn.Linear(300, 400)
    policy = load_policy(
        text=(
            "rules:\n"
            "  - match: {param: weight}\n"
            "    init: {scheme: kaiming_normal, nonlinearity: relu, fan_in: 100}\n"
            "  - match: {param: bias}\n"
            "    init: zeros\n"
        )
    )
    report = initrules.apply(model, policy, seed=0)

    row = report.row("weight")
    assert row.args["fan_in"] == 100
    expected = math.sqrt(2.0) / math.sqrt(100)
    assert row.expected_std == pytest.approx(expected)
    z_score = std_z_score(model.weight, expected, NORMAL_KURTOSIS)
    assert abs(z_score) < SIGMAS, f"{z_score:.1f} standard errors"
    # torch's fan_in of the (400, 300) weight is 300, a 42 % smaller std.
    z_torch = std_z_score(model.weight, kaiming_relu_std(300), NORMAL_KURTOSIS)
    assert abs(z_torch) > SIGMAS


# Report


def test_report_lists_blocks_counts_tensors() -> None:
    lstm = nn.LSTM(RNN_INPUT, RNN_HIDDEN)
    report = initrules.apply(lstm, LSTM_POLICY, seed=0)

    markdown = report.to_markdown()
    for gate in range(LSTM_GATES):
        label = f"weight_hh_l0[chunk {gate} of 4, dim 0]"
        assert f"| `{label}` |" in markdown, label
    assert "| `bias_hh_l0` |" in markdown
    assert "weight_hh_l0[chunk 1 of 4, dim 0]" in str(report)

    # weight_ih, weight_hh and bias_ih have 4 rows each, bias_hh one.
    assert len(report.rows) == 13
    summary = report.summary
    assert summary["initialized"] == 4
    assert summary["elements"] == sum(p.numel() for p in lstm.parameters())
    assert summary["unmatched"] == 0
    assert report.row("weight_hh_l0").chunk == (0, 4, 0)


def test_module_fans_of_split_linear() -> None:
    model = nn.Linear(8, 24)
    policy = load_policy(
        text=(
            "rules:\n"
            "  - match: {param: weight}\n"
            "    init: {scheme: xavier_uniform, chunks: 3, fans: module}\n"
            "  - match: {param: bias}\n"
            "    init: zeros\n"
        )
    )
    report = initrules.apply(model, policy, seed=0)
    for row in report.rows_of("weight"):
        assert (row.args["fan_in"], row.args["fan_out"]) == (8, 8)
        assert row.expected_std == pytest.approx(math.sqrt(2 / 16))
