"""Behaviour of `initrules.apply`: seeding, identity, wrappers, dtypes, errors, report.

Every model here is a real `torch.nn` module (or a tiny transformers GPT-2) and every
policy is YAML text. Statistical checks use fixed seeds and tolerances of five
standard errors, which draws from another seed would also pass except in rare cases.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import math
import textwrap
import warnings

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

import initrules

# Standard deviation of a standard normal truncated to [-2, 2].
TRUNCATED_STD = 0.87962566103423978


def load(text: str) -> initrules.Policy:
    return initrules.load_policy(text=textwrap.dedent(text))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in model.state_dict().items()}


def changed_tensors(model: nn.Module, before: dict[str, torch.Tensor]) -> list[str]:
    after = model.state_dict()
    return [
        name for name, value in before.items() if not torch.equal(after[name], value)
    ]


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


MLP_POLICY = """\
rules:
  - match: {module: Linear, param: weight}
    init: {scheme: normal, std: 0.5}
  - match: {param: bias}
    init: {scheme: uniform, a: -0.1, b: 0.1}
"""


def tiny_gpt2() -> GPT2LMHeadModel:
    config = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=100,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


GPT2_POLICY = """\
rules:
  - match: {module: Embedding}
    init: {scheme: normal, std: 0.02}
  - match: {module: Conv1D, param: weight}
    init: {scheme: normal, std: 0.02}
  - match: {module: LayerNorm, param: weight}
    init: ones
  - match: {param: bias}
    init: zeros
"""


# --- seeding ------------------------------------------------------------------


def test_seed_is_bit_identical() -> None:
    first, second = mlp(), mlp()
    assert not torch.equal(first[0].weight, second[0].weight), "fresh models agree"

    initrules.apply(first, load(MLP_POLICY), seed=7)
    initrules.apply(second, load(MLP_POLICY), seed=7)

    second_state = second.state_dict()
    differing = [
        name
        for name, value in first.state_dict().items()
        if not torch.equal(value, second_state[name])
    ]
    assert differing == []


def test_different_seeds_give_different_values() -> None:
    first, second = mlp(), mlp()

    initrules.apply(first, load(MLP_POLICY), seed=7)
    initrules.apply(second, load(MLP_POLICY), seed=8)

    second_state = second.state_dict()
    equal = [
        name
        for name, value in first.state_dict().items()
        if torch.equal(value, second_state[name])
    ]
    assert equal == []


def test_same_shapes_draw_different_values() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))

    initrules.apply(model, load(MLP_POLICY), seed=7)

    assert not torch.equal(model[0].weight, model[1].weight)


BASE_RULES = """\
rules:
  - match: {name: "0.weight"}
    init: {scheme: normal, std: 0.5}
  - match: {name: "2.weight"}
    init: {scheme: uniform, a: -1.0, b: 1.0}
  - match: {param: bias}
    init: zeros
"""

# Each variant changes only rules for tensors other than 0.weight and 2.weight. With
# one random stream shared by all tensors, the bias draws made before 2.weight shift it.
RULE_VARIANTS = {
    "random-bias-rule-added-first": """\
        rules:
          - match: {param: bias}
            init: {scheme: normal, std: 1.0}
          - match: {name: "0.weight"}
            init: {scheme: normal, std: 0.5}
          - match: {name: "2.weight"}
            init: {scheme: uniform, a: -1.0, b: 1.0}
        """,
    "weight-rules-swapped": """\
        rules:
          - match: {name: "2.weight"}
            init: {scheme: uniform, a: -1.0, b: 1.0}
          - match: {name: "0.weight"}
            init: {scheme: normal, std: 0.5}
          - match: {param: bias}
            init: zeros
        """,
    "rule-for-absent-module-added": """\
        rules:
          - match: {module: Conv2d}
            init: {scheme: normal, std: 3.0}
          - match: {name: "0.weight"}
            init: {scheme: normal, std: 0.5}
          - match: {name: "2.weight"}
            init: {scheme: uniform, a: -1.0, b: 1.0}
          - match: {param: bias}
            init: zeros
        """,
}


@pytest.mark.parametrize("variant", list(RULE_VARIANTS), ids=list(RULE_VARIANTS))
def test_unrelated_rule_changes_keep_draws(variant: str) -> None:
    base, other = mlp(), mlp()

    initrules.apply(base, load(BASE_RULES), seed=11)
    initrules.apply(other, load(RULE_VARIANTS[variant]), seed=11)

    assert torch.equal(other[0].weight, base[0].weight), "0.weight changed"
    assert torch.equal(other[2].weight, base[2].weight), "2.weight changed"


def test_manual_seed_repeats_unseeded_run() -> None:
    first, second = mlp(), mlp()

    torch.manual_seed(5)
    initrules.apply(first, load(MLP_POLICY))
    torch.manual_seed(5)
    initrules.apply(second, load(MLP_POLICY))

    assert torch.equal(first[0].weight, second[0].weight)
    assert torch.equal(first[2].bias, second[2].bias)


def test_unseeded_run_draws_from_global_generator() -> None:
    first, second = mlp(), mlp()

    torch.manual_seed(5)
    initrules.apply(first, load(MLP_POLICY))
    torch.manual_seed(6)
    initrules.apply(second, load(MLP_POLICY))

    assert not torch.equal(first[0].weight, second[0].weight)


def test_seeded_run_leaves_global_generator_alone() -> None:
    model = mlp()
    policy = load(
        """\
        rules:
          - match: {name: "0.weight"}
            init: default
          - match: {module: Linear, param: weight}
            init: orthogonal
          - match: {param: bias}
            init: {scheme: normal, std: 0.1}
        """
    )
    state = torch.get_rng_state()

    initrules.apply(model, policy, seed=3)

    assert torch.equal(torch.get_rng_state(), state)


# --- identity and requires_grad -----------------------------------------------


def test_mlp_keeps_identity_and_requires_grad() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8).to(torch.float16))
    model[0].bias.requires_grad_(False)
    model[1].weight.requires_grad_(False)
    before = dict(model.named_parameters())
    grads = {name: param.requires_grad for name, param in before.items()}
    values = snapshot(model)
    # The rules use three write paths: reset_parameters(), a float32 scratch draw for
    # the float16 layer, and a plain draw.
    policy = load(
        """\
        rules:
          - match: {name: "0.weight"}
            init: default
          - match: {name: "1.weight"}
            init: orthogonal
          - match: {param: bias}
            init: {scheme: normal, std: 0.1}
        """
    )

    initrules.apply(model, policy, seed=0)

    after = dict(model.named_parameters())
    replaced = [name for name, param in after.items() if param is not before[name]]
    flipped = [
        name for name, param in after.items() if param.requires_grad != grads[name]
    ]
    assert replaced == []
    assert flipped == []
    assert sorted(changed_tensors(model, values)) == sorted(values)


def test_gpt2_keeps_identity_and_requires_grad() -> None:
    model = tiny_gpt2()
    model.transformer.wpe.weight.requires_grad_(False)
    model.transformer.h[1].ln_2.bias.requires_grad_(False)
    before = dict(model.named_parameters(remove_duplicate=False))
    grads = {name: param.requires_grad for name, param in before.items()}
    attention_weight = model.transformer.h[0].attn.c_attn.weight.clone()

    report = initrules.apply(model, load(GPT2_POLICY), seed=0)

    after = dict(model.named_parameters(remove_duplicate=False))
    replaced = [name for name, param in after.items() if param is not before[name]]
    flipped = [
        name for name, param in after.items() if param.requires_grad != grads[name]
    ]
    assert report.unmatched == []
    assert replaced == []
    assert flipped == []
    assert not torch.equal(model.transformer.h[0].attn.c_attn.weight, attention_weight)


def test_gpt2_tied_weights_share_one_row() -> None:
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight, "not tied on build"

    report = initrules.apply(model, load(GPT2_POLICY), seed=0)

    rows = [row for row in report.rows if "lm_head.weight" in (row.name, *row.aliases)]
    assert model.lm_head.weight is model.transformer.wte.weight
    assert [row.name for row in rows] == ["transformer.wte.weight"]
    assert rows[0].aliases == ("lm_head.weight",)
    assert report.row("lm_head.weight").scheme == "normal"


# --- wrappers -----------------------------------------------------------------


def report_names(report: initrules.Report) -> list[str]:
    return [row.name for row in report.rows]


@pytest.mark.filterwarnings(
    # Raised by torch itself while torch.compile imports its backends.
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"
)
def test_compiled_model_reports_bare_names() -> None:
    bare = mlp()
    compiled = torch.compile(mlp())

    bare_report = initrules.apply(bare, load(MLP_POLICY), seed=2)
    compiled_report = initrules.apply(compiled, load(MLP_POLICY), seed=2)

    assert report_names(compiled_report) == report_names(bare_report)
    assert torch.equal(compiled._orig_mod[0].weight, bare[0].weight)


def test_data_parallel_reports_bare_names() -> None:
    bare = mlp()
    wrapped = nn.DataParallel(mlp())

    bare_report = initrules.apply(bare, load(MLP_POLICY), seed=2)
    wrapped_report = initrules.apply(wrapped, load(MLP_POLICY), seed=2)

    assert report_names(wrapped_report) == report_names(bare_report)
    assert torch.equal(wrapped.module[2].weight, bare[2].weight)


class Holder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.module = nn.Linear(3, 3)


CHILD_NAMED_MODULE = {
    "attribute": (Holder, ["module.weight", "module.bias"]),
    "module-dict": (
        lambda: nn.ModuleDict({"module": nn.Linear(3, 3)}),
        ["module.weight", "module.bias"],
    ),
    "inside-data-parallel": (
        lambda: nn.DataParallel(Holder()),
        ["module.weight", "module.bias"],
    ),
    "sequential-of-data-parallel": (
        lambda: nn.Sequential(nn.DataParallel(Holder())),
        ["0.module.weight", "0.module.bias"],
    ),
}


@pytest.mark.parametrize("case", list(CHILD_NAMED_MODULE), ids=list(CHILD_NAMED_MODULE))
def test_child_named_module_is_kept(case: str) -> None:
    build, expected = CHILD_NAMED_MODULE[case]

    report = initrules.apply(build(), load(MLP_POLICY), seed=0)

    assert report_names(report) == expected


# --- float16 and bfloat16 -----------------------------------------------------

LOW_PRECISION = [torch.float16, torch.bfloat16]
LOW_PRECISION_IDS = ["float16", "bfloat16"]
DRAW_SCHEMES = {
    "trunc_normal": "{scheme: trunc_normal, std: 0.02, a: -0.04, b: 0.04}",
    "orthogonal": "orthogonal",
}


def draw_weight(dtype: torch.dtype, scheme: str) -> torch.Tensor:
    model = nn.Linear(512, 256, bias=False).to(dtype)
    policy = load(f"rules:\n  - match: {{param: weight}}\n    init: {scheme}\n")
    initrules.apply(model, policy, seed=21)
    return model.weight.detach()


@pytest.mark.parametrize("scheme", list(DRAW_SCHEMES), ids=list(DRAW_SCHEMES))
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=LOW_PRECISION_IDS)
def test_low_precision_equals_rounded_float32(dtype: torch.dtype, scheme: str) -> None:
    low = draw_weight(dtype, DRAW_SCHEMES[scheme])
    full = draw_weight(torch.float32, DRAW_SCHEMES[scheme])

    assert low.dtype == dtype
    assert torch.equal(low, full.to(dtype))


@pytest.mark.parametrize("scheme", list(DRAW_SCHEMES), ids=list(DRAW_SCHEMES))
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=LOW_PRECISION_IDS)
def test_low_precision_std_matches_float32(dtype: torch.dtype, scheme: str) -> None:
    low = draw_weight(dtype, DRAW_SCHEMES[scheme]).float()
    full = draw_weight(torch.float32, DRAW_SCHEMES[scheme])

    # The tolerance is five standard errors of the difference between the std of two
    # independent draws.
    tolerance = 5 * full.std().item() / math.sqrt(full.numel())
    difference = abs(low.std().item() - full.std().item())
    assert difference <= tolerance, f"std differs by {difference:.3g}"


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=LOW_PRECISION_IDS)
def test_low_precision_orthogonal_is_orthonormal(dtype: torch.dtype) -> None:
    weight = draw_weight(dtype, "orthogonal").float()
    gram = weight @ weight.T

    error = (gram - torch.eye(weight.shape[0])).abs().max().item()
    assert error <= torch.finfo(dtype).eps, f"max |W W^T - I| = {error:.3g}"


# --- on_unmatched -------------------------------------------------------------

WEIGHTS_ONLY = """\
on_unmatched: {mode}
rules:
  - match: {{param: weight}}
    init: {{scheme: normal, std: 0.5}}
"""


def test_warn_mode_warns_and_keeps_unmatched() -> None:
    model = mlp()
    before = snapshot(model)

    with pytest.warns(initrules.InitRulesWarning, match=r"0\.bias, 2\.bias"):
        report = initrules.apply(model, load(WEIGHTS_ONLY.format(mode="warn")), seed=0)

    assert report.unmatched == ["0.bias", "2.bias"]
    assert sorted(changed_tensors(model, before)) == ["0.weight", "2.weight"]


def test_warn_message_names_count_and_tensors() -> None:
    with pytest.warns(initrules.InitRulesWarning) as record:
        initrules.apply(mlp(), load(WEIGHTS_ONLY.format(mode="warn")), seed=0)

    messages = [str(item.message) for item in record]
    assert messages == [
        "2 parameter(s) matched no rule of <text> and keep their current values: "
        "0.bias, 2.bias"
    ]
    # The warning points at the caller of apply, not into initrules.
    assert [item.filename for item in record] == [__file__]


def test_keep_mode_keeps_unmatched_silently() -> None:
    model = mlp()
    before = snapshot(model)

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        report = initrules.apply(model, load(WEIGHTS_ONLY.format(mode="keep")), seed=0)

    assert [str(item.message) for item in record] == []
    assert report.unmatched == ["0.bias", "2.bias"]
    assert sorted(changed_tensors(model, before)) == ["0.weight", "2.weight"]


def test_error_mode_raises_and_writes_nothing() -> None:
    model = mlp()
    before = snapshot(model)

    with pytest.raises(initrules.UnmatchedTensorsError) as excinfo:
        initrules.apply(model, load(WEIGHTS_ONLY.format(mode="error")), seed=0)

    assert excinfo.value.names == ["0.bias", "2.bias"]
    assert str(excinfo.value) == (
        "2 parameter(s) matched no rule of <text>:\n"
        "  0.bias\n"
        "  2.bias\n"
        "Add a rule that matches them, or set 'on_unmatched: warn' or "
        "'on_unmatched: keep' to leave them as they are."
    )
    assert changed_tensors(model, before) == []


# --- errors found while planning ----------------------------------------------


class Counter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(3, 3))
        self.register_buffer("steps", torch.arange(4))


class Scale(nn.Module):
    # A module without reset_parameters().
    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.full((4,), 2.0))


FIX_HINT = (
    "narrow the rule's match (for example with 'ndim' or 'param') or add an "
    "earlier rule for this tensor"
)

ARGS_HINT = "change the rule's arguments, or use another scheme for this tensor"

PLAN_ERRORS = {
    "xavier-on-bias": (
        lambda: nn.Linear(4, 3),
        """\
        rules:
          - match: {module: Linear}
            init: xavier_uniform
        """,
        "rule 1 at <text>:2:5 cannot initialize 'bias' (shape (3,), float32): "
        "xavier_uniform needs a tensor with at least 2 dimensions, got 1-D; "
        + FIX_HINT,
    ),
    "xavier-on-two-biases": (
        mlp,
        """\
        rules:
          - name: all linear
            match: {module: Linear}
            init: xavier_uniform
        """,
        "2 tensors cannot be initialized:\n"
        "  rule 1 'all linear' at <text>:2:5 cannot initialize '0.bias' "
        "(shape (16,), float32): xavier_uniform needs a tensor with at least "
        "2 dimensions, got 1-D; " + FIX_HINT + "\n"
        "  rule 1 'all linear' at <text>:2:5 cannot initialize '2.bias' "
        "(shape (4,), float32): xavier_uniform needs a tensor with at least "
        "2 dimensions, got 1-D; " + FIX_HINT,
    ),
    "normal-on-integer-buffer": (
        Counter,
        """\
        rules:
          - match: {param: weight}
            init: {scheme: normal, std: 0.02}
          - match: {kind: buffer}
            init: normal
        """,
        "rule 2 at <text>:4:5 cannot initialize 'steps' (shape (4,), int64): "
        "normal needs a real floating-point tensor, got int64; " + FIX_HINT,
    ),
    "default-without-reset-parameters": (
        lambda: nn.Sequential(nn.Linear(4, 4), Scale()),
        """\
        rules:
          - match: {module: Linear}
            init: {scheme: normal, std: 0.02}
          - match: {param: gain}
            init: default
        """,
        "rule 2 at <text>:4:5 cannot initialize '1.gain' (shape (4,), float32): "
        "default needs the owning module to define reset_parameters(), and Scale "
        "does not; choose another scheme for this tensor",
    ),
    "dirac-groups-do-not-divide": (
        lambda: nn.Conv2d(6, 4, 3, groups=1),
        """\
        rules:
          - match: {param: weight}
            init: {scheme: dirac, groups: 3}
          - match: {param: bias}
            init: zeros
        """,
        "rule 1 at <text>:2:5 cannot initialize 'weight' (shape (4, 6, 3, 3), "
        "float32): dirac needs dim 0 (4) to be divisible by groups (3); " + ARGS_HINT,
    ),
    "constant-not-an-integer": (
        Counter,
        """\
        rules:
          - match: {param: weight}
            init: {scheme: normal, std: 0.02}
          - match: {kind: buffer}
            init: {scheme: constant, val: 1.5}
        """,
        "rule 2 at <text>:4:5 cannot initialize 'steps' (shape (4,), int64): "
        "constant 1.5 cannot be stored in int64; " + ARGS_HINT,
    ),
}


@pytest.mark.parametrize("case", list(PLAN_ERRORS), ids=list(PLAN_ERRORS))
def test_plan_error_message_and_nothing_written(case: str) -> None:
    build, text, message = PLAN_ERRORS[case]
    model = build()
    before = snapshot(model)

    with pytest.raises(initrules.PlanError) as excinfo:
        initrules.apply(model, load(text), seed=0)

    assert str(excinfo.value) == message
    assert changed_tensors(model, before) == []


def test_meta_model_is_rejected() -> None:
    with torch.device("meta"):
        model = nn.Linear(4, 3)
    before = dict(model.named_parameters())

    with pytest.raises(initrules.PlanError) as excinfo:
        initrules.apply(model, load(MLP_POLICY), seed=0)

    assert str(excinfo.value) == (
        "2 tensor(s) are on the meta device and hold no memory (first: 'weight'); "
        "materialize the model first, for example with model.to_empty(device='cpu')"
    )
    assert all(param.is_meta for param in model.parameters())
    assert all(param is before[name] for name, param in model.named_parameters())


# Scheme arguments that torch.nn.init rejects only while writing. apply promises to
# raise before writing anything, but by then it has written the first Linear.
FILL_TIME_ERRORS = {
    "dirac-groups-not-dividing-channels": (
        lambda: nn.Sequential(nn.Linear(4, 4), nn.Conv1d(4, 5, 3)),
        """\
        rules:
          - match: {module: Conv1d, param: weight}
            init: {scheme: dirac, groups: 3}
          - match: {param: weight}
            init: {scheme: normal, std: 0.02}
          - match: {param: bias}
            init: zeros
        """,
    ),
    "uniform-with-a-above-b": (
        lambda: nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)),
        """\
        rules:
          - match: {name: "1.weight"}
            init: {scheme: uniform, a: 1.0, b: 0.0}
          - match: {param: weight}
            init: {scheme: normal, std: 0.02}
          - match: {param: bias}
            init: zeros
        """,
    ),
    "trunc_normal-with-a-above-b": (
        lambda: nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)),
        """\
        rules:
          - match: {name: "1.weight"}
            init: {scheme: trunc_normal, a: 1.0, b: 0.0}
          - match: {param: weight}
            init: {scheme: normal, std: 0.02}
          - match: {param: bias}
            init: zeros
        """,
    ),
}


@pytest.mark.parametrize("case", list(FILL_TIME_ERRORS), ids=list(FILL_TIME_ERRORS))
def test_bad_scheme_arguments_fail_before_writing(case: str) -> None:
    build, text = FILL_TIME_ERRORS[case]
    model = build()
    before = snapshot(model)

    with pytest.raises(initrules.InitRulesError):
        initrules.apply(model, load(text), seed=0)

    assert changed_tensors(model, before) == []


# --- zero-element tensors -----------------------------------------------------


class WithEmpty(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.empty_table = nn.Parameter(torch.empty(0, 4))
        self.bias = nn.Parameter(torch.zeros(3))


def test_zero_element_tensor_is_skipped() -> None:
    model = WithEmpty()
    policy = load(
        """\
        rules:
          - match: {param: empty_table}
            init: xavier_uniform
          - match: {param: bias}
            init: {scheme: normal, std: 1.0}
        """
    )

    # torch.nn.init would warn on a zero-element tensor, and warnings fail the tests.
    report = initrules.apply(model, policy, seed=0)

    assert report.skipped == [initrules.Skipped("empty_table", "zero elements")]
    assert report_names(report) == ["bias"]
    assert report.summary["skipped"] == 1


# --- the default and keep schemes ---------------------------------------------

DEFAULT_BIAS = """\
rules:
  - match: {param: weight}
    init: keep
  - match: {param: bias}
    init: default
"""


def test_default_rewrites_only_its_tensor() -> None:
    model = nn.Linear(32, 16)
    before = snapshot(model)

    report = initrules.apply(model, load(DEFAULT_BIAS), seed=4)

    bound = 1 / math.sqrt(32)
    largest = model.bias.abs().max().item()
    assert changed_tensors(model, before) == ["bias"]
    assert largest <= bound, f"|bias| reaches {largest:.4g}, bound {bound:.4g}"
    assert report.row("bias").scheme == "default"


def test_default_is_seed_deterministic() -> None:
    first, second = nn.Linear(32, 16), nn.Linear(32, 16)
    assert not torch.equal(first.bias, second.bias), "fresh models agree"

    # The global generator differs between the runs, so only the run's seed can make
    # the draws equal.
    torch.manual_seed(100)
    initrules.apply(first, load(DEFAULT_BIAS), seed=4)
    torch.manual_seed(200)
    initrules.apply(second, load(DEFAULT_BIAS), seed=4)

    assert torch.equal(first.bias, second.bias)


def test_default_differs_between_seeds() -> None:
    first, second = nn.Linear(32, 16), nn.Linear(32, 16)

    initrules.apply(first, load(DEFAULT_BIAS), seed=4)
    initrules.apply(second, load(DEFAULT_BIAS), seed=5)

    assert not torch.equal(first.bias, second.bias)


def test_default_keeps_sibling_buffers() -> None:
    model = nn.BatchNorm1d(8)
    with torch.no_grad():
        model.weight.fill_(3.0)
        model.bias.fill_(2.0)
        model.running_mean.fill_(0.5)
        model.running_var.fill_(4.0)
        model.num_batches_tracked.fill_(9)
    before = snapshot(model)
    policy = load(
        """\
        rules:
          - match: {param: weight}
            init: default
          - match: {param: bias}
            init: keep
        """
    )

    initrules.apply(model, policy, seed=0)

    assert changed_tensors(model, before) == ["weight"]
    assert torch.equal(model.weight, torch.ones(8))


class Block(nn.Module):
    # Its reset_parameters() also resets its child module.
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))
        self.proj = nn.Linear(4, 4)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.scale)
        self.proj.reset_parameters()


def test_default_leaves_child_modules_alone() -> None:
    model = Block()
    before = snapshot(model)
    policy = load(
        """\
        rules:
          - match: {param: scale}
            init: default
          - match: {module: Linear}
            init: keep
        """
    )

    initrules.apply(model, policy, seed=0)

    assert changed_tensors(model, before) == ["scale"]


def test_keep_is_bit_identical_and_reported() -> None:
    model = nn.Linear(8, 4)
    weight = model.weight.clone()
    policy = load(
        """\
        rules:
          - match: {param: weight}
            init: keep
          - match: {param: bias}
            init: zeros
        """
    )

    report = initrules.apply(model, policy, seed=0)

    assert torch.equal(model.weight, weight)
    assert report.row("weight").scheme == "keep"
    assert report.summary["kept"] == 1
    assert report.summary["initialized"] == 1


# --- variance_scaling and lecun_normal ----------------------------------------

# A Linear(256, 1024) weight has shape (1024, 256): fan_in 256, fan_out 1024.
FANS = {"fan_in": 256, "fan_out": 1024, "fan_avg": 640}
DISTRIBUTIONS = ("truncated_normal", "normal", "uniform")
# Each case maps to (init spec, distribution, target variance).
SCALING_CASES = {
    f"{dist}-{mode}": (
        f"{{scheme: variance_scaling, scale: 2.0, mode: {mode}, distribution: {dist}}}",
        dist,
        2.0 / fan,
    )
    for dist in DISTRIBUTIONS
    for mode, fan in FANS.items()
}
SCALING_CASES["lecun_normal"] = ("lecun_normal", "truncated_normal", 1.0 / 256)
BOUNDED_CASES = {
    case: values for case, values in SCALING_CASES.items() if values[1] != "normal"
}


def scaled_weight(init: str) -> torch.Tensor:
    model = nn.Linear(256, 1024, bias=False)
    policy = load(f"rules:\n  - match: {{param: weight}}\n    init: {init}\n")
    initrules.apply(model, policy, seed=13)
    return model.weight.detach()


@pytest.mark.parametrize("case", list(SCALING_CASES), ids=list(SCALING_CASES))
def test_scaling_std_matches_fans(case: str) -> None:
    init, _, variance = SCALING_CASES[case]

    weight = scaled_weight(init)

    expected = math.sqrt(variance)
    # The tolerance is five standard errors of a normal sample's std. It is looser
    # for the truncated normal and the uniform, whose tails are lighter.
    tolerance = 5 * expected / math.sqrt(2 * weight.numel())
    std = weight.std().item()
    assert abs(std - expected) <= tolerance, f"std {std:.5g}, expected {expected:.5g}"


@pytest.mark.parametrize("case", list(BOUNDED_CASES), ids=list(BOUNDED_CASES))
def test_scaling_stays_within_bounds(case: str) -> None:
    init, distribution, variance = BOUNDED_CASES[case]

    weight = scaled_weight(init)

    if distribution == "uniform":
        bound = math.sqrt(3 * variance)
    else:
        # Cut at two standard deviations of the widened normal.
        bound = 2 * math.sqrt(variance) / TRUNCATED_STD
    largest = weight.abs().max().item()
    assert largest <= bound * (1 + 1e-6), (
        f"|w| reaches {largest:.5g}, bound {bound:.5g}"
    )


# --- the report ---------------------------------------------------------------


class Reported(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.loose_scale = nn.Parameter(torch.ones(2))
        self.empty_table = nn.Parameter(torch.empty(0, 2))
        self.linear = nn.Linear(4, 3)
        self.norm = nn.BatchNorm1d(3)


REPORT_POLICY = """\
name: report check
on_unmatched: keep
rules:
  - match: {module: Linear, param: weight}
    init: {scheme: normal, std: 0.1}
  - match: {module: Linear, param: bias}
    init: keep
  - match: {module: BatchNorm1d}
    init: ones
  - match: {param: empty_table}
    init: zeros
"""


@pytest.fixture
def report() -> initrules.Report:
    return initrules.apply(Reported(), load(REPORT_POLICY), seed=0)


def test_report_to_dict_survives_json(report: initrules.Report) -> None:
    data = report.to_dict()

    assert json.loads(json.dumps(data, allow_nan=False)) == data
    assert data["summary"] == report.summary


def test_report_text_names_every_tensor(report: initrules.Report) -> None:
    text = str(report)

    names = [
        "linear.weight",
        "linear.bias",
        "norm.weight",
        "norm.bias",
        "loose_scale",
        "empty_table",
    ]
    missing = [name for name in names if name not in text]
    assert missing == [], text


def test_report_summary_counts(report: initrules.Report) -> None:
    assert report.summary == {
        "initialized": 3,
        "elements": 18,
        "kept": 1,
        "unmatched": 1,
        "skipped": 1,
        "untouched_buffers": 3,
    }


# --- inputs the plan must reject before writing --------------------------------


class Raising(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(2, 2))

    def reset_parameters(self) -> None:
        raise RuntimeError("broken reset")


def holder(tensor: torch.Tensor) -> nn.Module:
    module = nn.Module()
    module.weight = nn.Parameter(tensor)
    return module


REJECTED = {
    "uniform-beyond-float16": (
        lambda: nn.Linear(4, 4, bias=False).half(),
        "rules:\n  - match: {}\n    init: {scheme: uniform, a: -1.0e+5, b: 1.0e+5}\n",
        "rule 1 at <text>:2:5 cannot initialize 'weight' (shape (4, 4), float16): "
        "uniform with these arguments writes values up to about 2e+05, beyond the "
        "largest float16 value (6.55e+04); " + ARGS_HINT,
    ),
    "normal-beyond-float16": (
        lambda: nn.Linear(4, 4).half(),
        "rules:\n  - match: {}\n    init: {scheme: normal, std: 1.0e+6}\n",
        "2 tensors cannot be initialized:\n"
        "  rule 1 at <text>:2:5 cannot initialize 'weight' (shape (4, 4), float16): "
        "normal with these arguments writes values up to about 6e+06, beyond the "
        "largest float16 value (6.55e+04); " + ARGS_HINT + "\n"
        "  rule 1 at <text>:2:5 cannot initialize 'bias' (shape (4,), float16): "
        "normal with these arguments writes values up to about 6e+06, beyond the "
        "largest float16 value (6.55e+04); " + ARGS_HINT,
    ),
    "normal-on-complex": (
        lambda: holder(torch.zeros(4, 4, dtype=torch.complex64)),
        "rules:\n  - match: {}\n    init: normal\n",
        "rule 1 at <text>:2:5 cannot initialize 'weight' (shape (4, 4), complex64): "
        "normal needs a real floating-point tensor, got complex64; " + FIX_HINT,
    ),
    "xavier-on-empty-bias": (
        lambda: holder(torch.empty(0)),
        "rules:\n  - match: {}\n    init: xavier_uniform\n",
        "rule 1 at <text>:2:5 cannot initialize 'weight' (shape (0,), float32): "
        "xavier_uniform needs a tensor with at least 2 dimensions, got 1-D; "
        + FIX_HINT,
    ),
}


@pytest.mark.parametrize("case", list(REJECTED), ids=list(REJECTED))
def test_rejected_before_writing(case: str) -> None:
    build, text, message = REJECTED[case]
    model = build()
    before = snapshot(model)
    with pytest.raises(initrules.PlanError) as excinfo:
        initrules.apply(model, initrules.load_policy(text=text), seed=0)
    assert str(excinfo.value) == message
    assert changed_tensors(model, before) == []


def test_float8_draws_in_float32() -> None:
    model = nn.Linear(64, 64, bias=False).to(torch.float8_e4m3fn)
    reference = nn.Linear(64, 64, bias=False)
    policy = load("rules:\n  - match: {}\n    init: {scheme: normal, std: 0.5}\n")
    initrules.apply(model, policy, seed=3)
    initrules.apply(reference, policy, seed=3)
    expected = reference.weight.to(torch.float8_e4m3fn)
    assert torch.equal(model.weight.view(torch.uint8), expected.view(torch.uint8))


def test_write_failure_raises_apply_error() -> None:
    model = nn.Sequential(nn.Linear(2, 2), Raising())
    policy = load(
        """\
        rules:
          - match: {module: Linear}
            init: zeros
          - name: reset
            match: {module: Raising}
            init: default
        """
    )
    with pytest.raises(initrules.ApplyError) as excinfo:
        initrules.apply(model, policy, seed=0)
    assert str(excinfo.value) == (
        "rule 2 'reset' at <text>:4:5 failed on '1.weight': RuntimeError: broken "
        "reset; 2 tensor(s) were written before it, so the model is partly initialized"
    )


@pytest.mark.parametrize("seed", [7.0, "7", True], ids=["float", "str", "bool"])
def test_seed_must_be_int(seed: object) -> None:
    with pytest.raises(TypeError, match="seed must be an int or None"):
        initrules.apply(mlp(), load(MLP_POLICY), seed=seed)  # type: ignore[arg-type]


def test_non_module_is_type_error() -> None:
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module, got"):
        initrules.apply(mlp().state_dict(), load(MLP_POLICY))  # type: ignore[arg-type]


def test_module_cycle_is_walked_once() -> None:
    outer = nn.Sequential(nn.Linear(2, 2))
    inner = nn.Sequential(nn.Linear(2, 2))
    outer.add_module("inner", inner)
    inner.add_module("back", outer)
    report = initrules.apply(outer, load(MLP_POLICY), seed=0)
    assert [row.name for row in report.rows] == [
        "0.weight",
        "0.bias",
        "inner.0.weight",
        "inner.0.bias",
    ]


class TiedHead(nn.Module):
    # The head comes first in module order, so the tied tensor's first name
    # belongs to a Linear, not to the embedding with padding_idx.
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, 10, bias=False)
        self.embed = nn.Embedding(10, 8, padding_idx=0)
        self.head.weight = self.embed.weight


def test_padding_row_zeroed_through_tied_name() -> None:
    model = TiedHead()
    report = initrules.apply(
        model, load("rules:\n  - match: {}\n    init: normal\n"), seed=0
    )
    assert report.row("head.weight").note == "padding row 0 zeroed"
    assert torch.count_nonzero(model.embed.weight[0]) == 0


class Replacing(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(3))

    def reset_parameters(self) -> None:
        self.weight = nn.Parameter(torch.full((3,), 5.0))


def test_default_keeps_parameter_identity() -> None:
    model = Replacing()
    original = model.weight
    report = initrules.apply(model, load("rules:\n  - match: {}\n    init: default\n"))
    assert model.weight is original
    assert torch.equal(model.weight, torch.full((3,), 5.0))
    assert report.row("weight").max == 5.0


def test_report_dict_is_strict_json() -> None:
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.fill_(float("nan"))
    report = initrules.apply(model, load("rules:\n  - match: {}\n    init: keep\n"))
    text = json.dumps(report.to_dict(), allow_nan=False)
    assert '"mean": "nan"' in text
