"""Test arithmetic expressions in scheme arguments.

Covers the load-time whitelist and its error messages, evaluation per tensor
(vars, regex groups, fans, shape, module and config attributes), evaluation
errors, the ``--var`` option of the console script, the GPT-2 policy and the
JSON Schema. The console script runs in subprocesses that the ``runs``
fixture starts together, since each one spends seconds importing torch.
transformers is imported inside the tests that build its models, so that its
import overlaps with those subprocesses instead of delaying their start.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import math
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import jsonschema
import pytest
import torch
from torch import nn

import initrules
from initrules import InitRulesError, PlanError, PolicyError, load_policy

REPO_ROOT = Path(__file__).resolve().parents[1]
GPT2_POLICY = REPO_ROOT / "policies" / "gpt2.yaml"
TIMEOUT_S = 180

# policy_text puts each expression on line 8, column 12, so its load errors
# start with this prefix.
AT_STD = "<text>:8:12: 'init.std' of rule 1: "
WHITELIST = (
    "; use numbers, + - * / // % **, parentheses, sqrt/log/exp/min/max/abs, vars, "
    "regex groups, fan_in, fan_out, numel, shape[i], module.NAME and config.NAME"
)
EXPRESSION_HINT = "fix the expression, or give the names it uses a value under 'vars'"
VALUE_HINT = "change the expression so that it gives a valid value"

# Measured stds must lie within this many standard errors of the expected std.
# Every tensor measured here has at least 4,096 elements, so the tolerance is
# at most about 5.5 % of the expected std.
SIGMAS = 5.0


def policy_text(
    expression: str,
    *,
    key: str = "std",
    scheme: str = "normal",
    param: str = "weight",
) -> str:
    """Return a policy whose rule 1 sets ``key`` to ``expression`` (line 8)."""
    return (
        "vars: {k: 2}\n"
        "checks: {scale: false}\n"
        "rules:\n"
        "  - name: scaled\n"
        f"    match: {{param: '{param}'}}\n"
        "    init:\n"
        f"      scheme: {scheme}\n"
        f"      {key}: {json.dumps(expression)}\n"
        "  - match: {param: bias}\n"
        "    init: zeros\n"
    )


def rejection(expression: str, reason: str) -> str:
    """Return the full load error for a form the whitelist does not allow."""
    return (
        f"{AT_STD}invalid expression {expression!r}: {reason} is not allowed"
        f"{WHITELIST}, got {expression!r}"
    )


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def std_tolerance(expected: float, numel: int) -> float:
    """Return SIGMAS standard errors of the std of ``numel`` normal draws."""
    return SIGMAS * expected / math.sqrt(2 * numel)


def small_gpt2(n_layer: int) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=n_layer,
        n_embd=64,
        n_head=2,
        vocab_size=64,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def small_llama(layers: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    return LlamaForCausalLM(config)


def transformers_conv1d() -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    # Conv1D(nf, nx) stores its weight as (nx, nf), that is (in, out).
    return Conv1D(7, 5)


# --- subprocesses -----------------------------------------------------------------

CLI_POLICY = """\
vars: {k: 1}
checks: {scale: false}
rules:
  - name: scaled
    match: {param: weight}
    init: {scheme: normal, std: "k / 100"}
  - match: {param: bias}
    init: zeros
"""

LINEAR_ARGS = [
    "--model",
    "torch.nn:Linear",
    "--model-arg",
    "in_features=64",
    "--model-arg",
    "out_features=64",
]

Runs = dict[str, subprocess.Popen[str]]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("expressions")
    (root / "policy.yaml").write_text(CLI_POLICY, encoding="utf-8")
    return root


@pytest.fixture(scope="module", autouse=True)
def runs(workspace: Path) -> Iterator[Runs]:
    """Start every console-script case; tests wait for the one they need."""
    script = str(Path(sys.executable).with_name("initrules"))
    cases = {
        "var": [
            "apply",
            "policy.yaml",
            *LINEAR_ARGS,
            "--var",
            "k=2",
            "--seed",
            "0",
            "--out",
            "state.pt",
        ],
        "no_equals": ["apply", "policy.yaml", *LINEAR_ARGS, "--var", "bad"],
        "not_number": ["apply", "policy.yaml", *LINEAR_ARGS, "--var", "k=abc"],
        "explain": [
            "explain",
            str(GPT2_POLICY),
            "--model",
            "transformers:GPT2LMHeadModel",
            "--model-arg",
            "n_layer=2",
            "--model-arg",
            "n_embd=32",
            "--model-arg",
            "n_head=2",
            "--model-arg",
            "vocab_size=64",
            "--model-arg",
            "n_positions=16",
            "--param",
            "**.h.0.attn.c_proj.weight",
        ],
    }
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    processes = {
        name: subprocess.Popen(
            [script, *args],
            cwd=workspace,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, args in cases.items()
    }
    yield processes
    for process in processes.values():
        if process.poll() is None:
            process.kill()
            process.communicate()


def finish(runs: Runs, name: str) -> tuple[int, str, str]:
    """Wait for one case and return its exit code, stdout and stderr."""
    stdout, stderr = runs[name].communicate(timeout=TIMEOUT_S)
    return runs[name].returncode, stdout, stderr


# --- load-time errors ---------------------------------------------------------------

CALL = "a call of anything but sqrt/log/exp/min/max/abs"
ATTRIBUTE = "an attribute other than module.NAME or config.NAME"
SUBSCRIPT = "indexing other than shape[i]"

# Expression -> the reason that follows "invalid expression '...': ".
BAD_FORMS = {
    "__import__('os')": CALL,
    "x.__class__": ATTRIBUTE,
    "module.__class__": "the private attribute '__class__'",
    "config.a.b": ATTRIBUTE,
    "(lambda: 1)()": CALL,
    "[i for i in range(3)]": "a ListComp expression",
    "{1: 2}": "a Dict expression",
    '"a" + "b"': "the constant 'a'",
    "True": "the constant True",
    "sqrt(x=1)": "a call without plain arguments",
    "sqrt(*[1])": "a starred argument",
    "f(1)": CALL,
    "shape[0:1]": SUBSCRIPT,
    "shape[x]": SUBSCRIPT,
    "a if b else c": "a IfExp expression",
    "1 < 2": "a Compare expression",
    "module": "the bare name 'module'",
    "sqrt": "the bare name 'sqrt'",
}


@pytest.mark.parametrize("expression", list(BAD_FORMS))
def test_bad_form_message(expression: str) -> None:
    with pytest.raises(PolicyError) as caught:
        load_policy(text=policy_text(expression))
    assert str(caught.value) == rejection(expression, BAD_FORMS[expression])


@pytest.mark.parametrize(
    ("expression", "reason"),
    [
        ("0.02 +", "invalid syntax"),
        ("sqrt(", "'(' was never closed"),
        ("", "invalid syntax"),
    ],
)
def test_syntax_error_message(expression: str, reason: str) -> None:
    with pytest.raises(PolicyError) as caught:
        load_policy(text=policy_text(expression))
    expected = (
        f"{AT_STD}invalid expression {expression!r}: {reason}, got {expression!r}"
    )
    assert str(caught.value) == expected


def test_unknown_name_message() -> None:
    with pytest.raises(PolicyError) as caught:
        load_policy(text=policy_text("0.02 * depth"))
    expected = (
        f"{AT_STD}unknown name 'depth' in '0.02 * depth'; names defined here: "
        "fan_in, fan_out, k, numel, shape (declare others under 'vars', or name "
        "a group of the rule's regex)"
    )
    assert str(caught.value) == expected


def test_unknown_name_lists_groups() -> None:
    text = (
        "rules:\n"
        "  - match: {regex: 'layers\\.(?P<layer>\\d+)\\.weight'}\n"
        "    init: {scheme: normal, std: 'layer / depth'}\n"
    )
    with pytest.raises(PolicyError) as caught:
        load_policy(text=text)
    expected = (
        "<text>:3:33: 'init.std' of rule 1: unknown name 'depth' in "
        "'layer / depth'; names defined here: fan_in, fan_out, layer, numel, "
        "shape (declare others under 'vars', or name a group of the rule's regex)"
    )
    assert str(caught.value) == expected


def test_long_expression_message() -> None:
    expression = "1" * 1001
    with pytest.raises(PolicyError) as caught:
        load_policy(text=policy_text(expression))
    truncated = "'" + "1" * 56 + "..."
    reason = f"expression is 1001 characters long; the limit is 1000, got {truncated}"
    expected = AT_STD + reason
    assert str(caught.value) == expected


def test_limit_length_loads() -> None:
    expression = "0.01" + " " * 996
    policy = load_policy(text=policy_text(expression))
    assert policy.rules[0].init.expressions["std"].text == expression


def test_error_position_in_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(
        "rules:\n"
        "  - match: {param: bias}\n"
        "    init: zeros\n"
        "  - match: {param: weight}\n"
        "    init:\n"
        "      scheme: normal\n"
        "      mean: 0.0\n"
        "      std:   'f(1)'\n",
        encoding="utf-8",
    )
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    assert caught.value.path == str(path)
    assert caught.value.line == 8
    assert caught.value.column == 14
    assert caught.value.reason.startswith("'init.std' of rule 2: invalid expression")


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        (
            "fan_in: 2",
            "'vars': invalid var name 'fan_in': it is reserved in expressions",
        ),
        (
            "module: 2",
            "'vars': invalid var name 'module': it is reserved in expressions",
        ),
        ("sqrt: 2", "'vars': invalid var name 'sqrt': it is reserved in expressions"),
        (
            "_k: 2",
            "'vars': invalid var name '_k': expected an identifier that does not "
            "start with '_'",
        ),
    ],
)
def test_reserved_var_names(entry: str, reason: str) -> None:
    text = f"vars: {{{entry}}}\nrules: [{{match: {{}}, init: zeros}}]\n"
    with pytest.raises(PolicyError) as caught:
        load_policy(text=text)
    assert str(caught.value) == f"<text>:1:7: {reason}"


def test_var_must_be_number() -> None:
    text = "vars: {k: abc}\nrules: [{match: {}, init: zeros}]\n"
    with pytest.raises(PolicyError) as caught:
        load_policy(text=text)
    expected = "<text>:1:11: 'vars.k': input should be a valid number, got 'abc'"
    assert str(caught.value) == expected


@pytest.mark.parametrize("value", [".nan", ".inf"])
def test_nonfinite_var_rejected(value: str) -> None:
    text = f"vars: {{k: {value}}}\nrules: [{{match: {{}}, init: zeros}}]\n"
    with pytest.raises(PolicyError):
        load_policy(text=text)


def test_bare_shape_rejected() -> None:
    with pytest.raises(PolicyError):
        load_policy(text=policy_text("0.01 * shape"))


@pytest.mark.parametrize(
    "expression", ["max(1)", "min(0.5)", "sqrt(1, 2)", "exp(1, 2)"]
)
def test_wrong_arity_is_initrules_error(expression: str) -> None:
    model = nn.Linear(4, 3)
    with pytest.raises(InitRulesError):
        initrules.apply(model, load_policy(text=policy_text(expression)), seed=0)


# --- no escape from the whitelist -------------------------------------------------

ESCAPES = [
    "__import__('os').system('true')",
    "x.__class__",
    "(1).__class__",
    "module.__class__",
    "config.__class__.__name__",
    "config.__dict__",
    "module._parameters",
    "module._modules",
    "config.to_dict()",
    "sqrt.__self__",
    "(lambda: 0)()",
    "(lambda: 0)",
    "[x for x in (1, 2)]",
    "{x for x in (1, 2)}",
    "{x: x for x in (1, 2)}",
    "sum(x for x in (1, 2))",
    "(x for x in (1, 2))",
    "(x := 1)",
    "config['n_layer']",
    "module[0]",
    "k[0]",
    "fan_in[0]",
    "shape[0][0]",
    "(1, 2)[0]",
    "'abc'[0]",
    "f'{k}'",
    "getattr(module, 'weight')",
    "eval('1')",
    "sqrt(1).__class__",
    "max(k, key=abs)",
]


@pytest.mark.parametrize("expression", ESCAPES)
def test_escape_rejected_at_load(expression: str) -> None:
    with pytest.raises(PolicyError) as caught:
        load_policy(text=policy_text(expression))
    assert "is not allowed" in caught.value.reason


def test_dunder_name_unknown() -> None:
    with pytest.raises(PolicyError) as caught:
        load_policy(text=policy_text("__builtins__"))
    assert "unknown name '__builtins__'" in caught.value.reason


def test_escape_executes_nothing(tmp_path: Path) -> None:
    target = tmp_path / "written"
    attempts = [
        f"__import__('pathlib').Path({str(target)!r}).write_text('x')",
        f"config.__class__.__init__.__globals__['os'].mkdir({str(target)!r})",
        f"(lambda: open({str(target)!r}, 'w'))()",
        f"[open({str(target)!r}, 'w') for _ in (1,)]",
    ]
    model = nn.Linear(4, 3)
    for index, expression in enumerate(attempts):
        path = tmp_path / f"policy{index}.yaml"
        path.write_text(policy_text(expression), encoding="utf-8")
        with pytest.raises(PolicyError):
            initrules.apply(model, path, seed=0)
        assert not target.exists(), expression


def test_group_named_like_builtin() -> None:
    # A regex group named __import__ only defines a number, so the call is
    # still rejected.
    text = (
        "rules:\n"
        "  - match: {regex: '(?P<__import__>\\d+)\\.weight'}\n"
        "    init: {scheme: normal, std: \"__import__('os')\"}\n"
    )
    with pytest.raises(PolicyError) as caught:
        load_policy(text=text)
    assert "a call of anything but" in caught.value.reason


# --- evaluation ---------------------------------------------------------------------


def test_vars_and_override() -> None:
    policy = load_policy(text=policy_text("k / 100"))
    default = initrules.apply(nn.Linear(4, 3), policy, seed=0)
    override = initrules.apply(nn.Linear(4, 3), policy, seed=0, vars={"k": 5})
    assert default.rows[0].args == {"mean": 0.0, "std": 0.02}
    assert override.rows[0].args == {"mean": 0.0, "std": 0.05}


def test_check_and_build_override() -> None:
    policy = load_policy(text=policy_text("k / 100"))
    checked = initrules.check(nn.Linear(4, 3), policy, vars={"k": 3})
    _, built = initrules.build(lambda: nn.Linear(4, 3), policy, seed=0, vars={"k": 4})
    assert checked.rows[0].args["std"] == 0.03
    assert built.rows[0].args["std"] == 0.04


def test_override_changes_weights() -> None:
    policy = load_policy(text=policy_text("k / 100"))
    model = nn.Linear(256, 64)
    initrules.apply(model, policy, seed=0, vars={"k": 10})
    measured = model.weight.std().item()
    assert abs(measured - 0.1) < std_tolerance(0.1, model.weight.numel())


def test_regex_captures_scale_depth() -> None:
    model = small_llama(layers=4)
    text = (
        "on_unmatched: keep\n"
        "checks: {scale: false}\n"
        "rules:\n"
        "  - match:\n"
        "      regex: 'model\\.layers\\.(?P<layer>\\d+)\\."
        "(self_attn\\.o_proj|mlp\\.down_proj)\\.weight'\n"
        "    init: {scheme: normal, std: '0.02 / sqrt(2 * (layer + 1))'}\n"
    )
    report = initrules.apply(model, load_policy(text=text), seed=0)
    assert len(report.rows) == 8
    for row in report.rows:
        layer = int(row.captures["layer"])
        expected = 0.02 / math.sqrt(2 * (layer + 1))
        assert row.args["std"] == pytest.approx(expected, rel=1e-12), row.name
        assert row.std is not None
        assert abs(row.std - expected) < std_tolerance(expected, row.numel), row.name


def test_captures_are_integers() -> None:
    # Floor division and modulo give these values only if each capture became
    # an int.
    model = nn.ModuleDict({str(index): nn.Linear(4, 3) for index in range(4)})
    text = (
        "on_unmatched: keep\n"
        "checks: {scale: false}\n"
        "rules:\n"
        "  - match: {regex: '(?P<layer>\\d+)\\.weight'}\n"
        "    init: {scheme: constant, val: 'layer // 2 * 10 + layer % 2'}\n"
    )
    report = initrules.apply(model, load_policy(text=text), seed=0)
    values = [row.args["val"] for row in report.rows]
    assert values == [0.0, 1.0, 10.0, 11.0]


# Module factory -> (fan_in, fan_out) as the module uses its weight.
FANS: dict[str, tuple[Callable[[], nn.Module], int, int]] = {
    "linear": (lambda: nn.Linear(5, 7), 5, 7),
    "conv2d": (lambda: nn.Conv2d(3, 8, (2, 4)), 3 * 2 * 4, 8 * 2 * 4),
    # True fans: per group, and a stride divides the fan on the strided side.
    "grouped_conv2d": (lambda: nn.Conv2d(4, 8, 3, groups=2), 2 * 9, 4 * 9),
    "strided_conv2d": (lambda: nn.Conv2d(4, 8, 3, stride=2), 4 * 9, 8 * 9 // 4),
    "conv_transpose2d": (
        lambda: nn.ConvTranspose2d(4, 6, 3, stride=(1, 3), groups=2),
        2 * 9 // 3,
        3 * 9,
    ),
    "conv1d_transformers": (transformers_conv1d, 5, 7),
}


@pytest.mark.parametrize("case", list(FANS))
def test_fans_of_module(case: str) -> None:
    factory, fan_in, fan_out = FANS[case]
    policy = load_policy(text=policy_text("fan_in * 1000 + fan_out", key="mean"))
    report = initrules.apply(factory(), policy, seed=0)
    assert report.rows[0].args["mean"] == fan_in * 1000 + fan_out


def test_gpt2_c_attn_fans() -> None:
    model = small_gpt2(n_layer=1)
    text = (
        "on_unmatched: keep\n"
        "checks: {scale: false}\n"
        "rules:\n"
        "  - match: {name: '**.c_attn.weight'}\n"
        "    init: {scheme: constant, val: 'fan_in * 1000 + fan_out'}\n"
    )
    report = initrules.apply(model, load_policy(text=text), seed=0)
    n_embd = model.config.n_embd
    assert report.rows[0].args["val"] == n_embd * 1000 + 3 * n_embd


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("numel", 60.0),
        ("shape[0]", 10.0),
        ("shape[1]", 6.0),
        ("module.in_features", 6.0),
        ("module.out_features / 4", 2.5),
        ("max(shape[0], shape[1]) - min(2, 3)", 8.0),
        ("abs(-2) ** 3 % 5", 3.0),
        ("log(exp(2))", 2.0),
    ],
)
def test_tensor_names_evaluate(expression: str, expected: float) -> None:
    policy = load_policy(text=policy_text(expression, key="val", scheme="constant"))
    model = nn.Linear(6, 10)
    report = initrules.apply(model, policy, seed=0)
    assert report.rows[0].args["val"] == pytest.approx(expected, rel=1e-12)
    assert torch.all(model.weight == torch.tensor(expected)).item()


def test_negative_shape_index() -> None:
    policy = load_policy(text=policy_text("shape[-1]", key="val", scheme="constant"))
    report = initrules.apply(nn.Linear(6, 10), policy, seed=0)
    assert report.rows[0].args["val"] == 6.0


def test_config_attribute() -> None:
    model = small_gpt2(n_layer=1)
    text = (
        "on_unmatched: keep\n"
        "checks: {scale: false}\n"
        "rules:\n"
        "  - match: {name: transformer.wte.weight}\n"
        "    init: {scheme: constant, val: 'config.hidden_size + config.n_layer'}\n"
    )
    report = initrules.apply(model, load_policy(text=text), seed=0)
    assert report.rows[0].args["val"] == model.config.n_embd + 1


def test_float_field_gets_float() -> None:
    policy = load_policy(text=policy_text("1 + 1"))
    report = initrules.apply(nn.Linear(4, 3), policy, seed=0)
    assert type(report.rows[0].args["std"]) is float


def test_literal_field_kept_as_text() -> None:
    # `mode` is not numeric, so "fan_in" stays the mode, not a fan expression.
    text = (
        "checks: {scale: false}\n"
        "rules:\n"
        "  - match: {param: weight}\n"
        "    init: {scheme: kaiming_uniform, a: 'sqrt(5)', mode: fan_in}\n"
        "  - match: {param: bias}\n"
        "    init: zeros\n"
    )
    report = initrules.apply(nn.Linear(4, 3), load_policy(text=text), seed=0)
    assert report.rows[0].args["a"] == math.sqrt(5)
    assert report.rows[0].args["mode"] == "fan_in"


def test_int_field_from_attribute() -> None:
    text = (
        "checks: {scale: false}\n"
        "rules:\n"
        "  - match: {param: weight}\n"
        "    init: {scheme: dirac, groups: 'module.groups'}\n"
        "  - match: {param: bias}\n"
        "    init: zeros\n"
    )
    model = nn.Conv2d(4, 4, 3, groups=2)
    report = initrules.apply(model, load_policy(text=text), seed=0)
    assert report.rows[0].args["groups"] == 2
    assert type(report.rows[0].args["groups"]) is int


def test_superscript_capture_is_plan_error() -> None:
    model = nn.ModuleDict({"²": nn.Linear(2, 2)})
    text = (
        "on_unmatched: keep\n"
        "rules:\n"
        "  - match: {regex: '(?P<index>.+)\\.weight'}\n"
        "    init: {scheme: normal, std: '0.01 * (index + 1)'}\n"
    )
    with pytest.raises(PlanError):
        initrules.apply(model, load_policy(text=text), seed=0)


# --- evaluation errors --------------------------------------------------------------

WEIGHT = "'0.weight' (shape (3, 4), float32)"


def failed(reason: str) -> str:
    return f"argument expression failed: {reason}; {EXPRESSION_HINT}"


# Expression -> (parameter glob, tensor, what follows "cannot initialize TENSOR: ").
EVALUATION_ERRORS = {
    "1 / 0": ("weight", WEIGHT, failed("'1 / 0' divides by zero")),
    "10 ** 10 ** 10": ("weight", WEIGHT, failed("10 ** 10000000000 is beyond 1e+300")),
    "module.weight": (
        "weight",
        WEIGHT,
        failed("module.weight is not a number (a Parameter)"),
    ),
    "module.nothing": (
        "weight",
        WEIGHT,
        failed("module.nothing is not a number (no such attribute)"),
    ),
    "config.n_layer": (
        "weight",
        WEIGHT,
        failed("config.n_layer is not available: the model has no config"),
    ),
    "shape[5]": ("weight", WEIGHT, failed("shape[5] is out of range for a 2-D tensor")),
    "log(-1)": ("weight", WEIGHT, failed("'log(-1)' failed: math domain error")),
    "exp(1000)": ("weight", WEIGHT, failed("'exp(1000)' failed: math range error")),
    "1e308 * 10": (
        "weight",
        WEIGHT,
        failed("'1e308 * 10' gives inf, not a finite number"),
    ),
    "-1 * 0.02": (
        "weight",
        WEIGHT,
        "the evaluated arguments (std=-0.02) are invalid: std: Input should be "
        f"greater than or equal to 0; {VALUE_HINT}",
    ),
}


@pytest.mark.parametrize("expression", list(EVALUATION_ERRORS))
def test_evaluation_error_message(expression: str) -> None:
    param, tensor, detail = EVALUATION_ERRORS[expression]
    policy = load_policy(text=policy_text(expression, param=param))
    model = nn.Sequential(nn.Linear(4, 3))
    before = snapshot(model)
    with pytest.raises(PlanError) as caught:
        initrules.apply(model, policy, seed=0)
    expected = f"rule 1 'scaled' at <text>:4:5 cannot initialize {tensor}: {detail}"
    assert str(caught.value) == expected
    assert_unchanged(model, before)


def test_fans_of_a_norm_weight_are_an_error() -> None:
    policy = load_policy(text=policy_text("fan_in / 1000", param="weight"))
    model = nn.Sequential(nn.LayerNorm(3))
    before = snapshot(model)
    with pytest.raises(PlanError) as caught:
        initrules.apply(model, policy, seed=0)
    reason = (
        "fan_in and fan_out need a tensor with at least 2 dimensions, or one whose "
        "module has a weight with at least 2; got a 1-D tensor of LayerNorm"
    )
    assert str(caught.value) == (
        "rule 1 'scaled' at <text>:4:5 cannot initialize '0.weight' (shape (3,), "
        f"float32): {failed(reason)}"
    )
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    ("factory", "fan_in"),
    [
        (lambda: nn.Linear(5, 3), 5),
        (lambda: nn.Conv2d(4, 6, 3, groups=2), 2 * 9),
    ],
    ids=["linear", "grouped_conv2d"],
)
def test_bias_gets_the_fans_of_its_weight(
    factory: Callable[[], nn.Module], fan_in: int
) -> None:
    # torch's own bias init draws from U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    text = (
        "checks: {scale: false}\n"
        "rules:\n"
        "  - match: {param: weight}\n"
        "    init: zeros\n"
        "  - match: {param: bias}\n"
        "    init: {scheme: uniform, a: '-1 / sqrt(fan_in)', b: '1 / sqrt(fan_in)'}\n"
    )
    report = initrules.apply(factory(), load_policy(text=text), seed=0)
    assert report.row("bias").args["b"] == pytest.approx(1 / math.sqrt(fan_in))


def test_nested_power_rejected() -> None:
    # Computing this power would not finish, so it must be rejected unevaluated.
    policy = load_policy(text=policy_text("9 ** 9 ** 9 ** 9"))
    with pytest.raises(PlanError) as caught:
        initrules.apply(nn.Linear(4, 3), policy, seed=0)
    assert "is beyond 1e+300" in str(caught.value)


def test_check_raises_evaluation_error() -> None:
    model = nn.Sequential(nn.Linear(4, 3))
    before = snapshot(model)
    policy = load_policy(text=policy_text("k / (k - 2)"))
    with pytest.raises(PlanError) as caught:
        initrules.check(model, policy)
    assert "'k / (k - 2)' divides by zero" in str(caught.value)
    assert_unchanged(model, before)


def test_override_makes_error() -> None:
    policy = load_policy(text=policy_text("0.01 * k"))
    model = nn.Sequential(nn.Linear(4, 3))
    before = snapshot(model)
    with pytest.raises(PlanError) as caught:
        initrules.apply(model, policy, seed=0, vars={"k": -1})
    assert "(std=-0.01) are invalid" in str(caught.value)
    assert_unchanged(model, before)


# --- console script -----------------------------------------------------------------


def test_cli_var_overrides(runs: Runs, workspace: Path) -> None:
    code, stdout, stderr = finish(runs, "var")
    assert code == 0, stderr
    assert "normal(mean=0.0, std=0.02)" in stdout
    state = torch.load(workspace / "state.pt", weights_only=True)
    measured = state["weight"].std().item()
    assert abs(measured - 0.02) < std_tolerance(0.02, state["weight"].numel())


@pytest.mark.parametrize(
    ("case", "value"), [("no_equals", "bad"), ("not_number", "k=abc")]
)
def test_cli_bad_var(runs: Runs, case: str, value: str) -> None:
    code, stdout, stderr = finish(runs, case)
    assert code == 2
    assert stdout == ""
    expected = (
        f"initrules apply: error: argument --var: invalid --var {value!r}: "
        "expected NAME=NUMBER, such as n_layer=24"
    )
    assert stderr.splitlines()[-1] == expected


def test_cli_explain_shows_expression(runs: Runs) -> None:
    code, stdout, stderr = finish(runs, "explain")
    assert code == 0, stderr
    lines = stdout.splitlines()
    assert lines[0] == "transformer.h.0.attn.c_proj.weight (Conv1D, 32x32, float32)"
    assert lines[1] == f"  winner: rule 1 'residual projections' at {GPT2_POLICY}:15:5"
    # n_layer=2: 0.02 / sqrt(4).
    expected = (
        "    init: normal(mean=0.0, std=0.01 from 'config.initializer_range / "
        "sqrt(2 * config.n_layer)')"
    )
    assert lines[2] == expected


# --- GPT-2 policy -------------------------------------------------------------------


@pytest.mark.parametrize("n_layer", [3, 24])
def test_gpt2_residual_std(n_layer: int) -> None:
    model = small_gpt2(n_layer)
    report = initrules.apply(model, GPT2_POLICY, seed=0)
    expected = model.config.initializer_range / math.sqrt(2 * n_layer)
    rows = [row for row in report.rows if row.name.endswith(".c_proj.weight")]
    assert len(rows) == 2 * n_layer
    for row in rows:
        assert row.args["std"] == pytest.approx(expected, rel=1e-12), row.name
    largest = max(rows, key=lambda row: row.numel)
    assert largest.std is not None
    assert abs(largest.std - expected) < std_tolerance(expected, largest.numel)
    c_fc = next(row for row in report.rows if row.name.endswith(".c_fc.weight"))
    assert c_fc.args["std"] == model.config.initializer_range


# --- JSON Schema --------------------------------------------------------------------


def schema_validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(initrules.policy_json_schema())


def normal_policy(std: object) -> dict[str, object]:
    init = {"scheme": "normal", "std": std}
    return {"vars": {"k": 2}, "rules": [{"match": {"param": "weight"}, "init": init}]}


def test_schema_accepts_expression() -> None:
    validator = schema_validator()
    assert validator.is_valid(normal_policy("0.02 / sqrt(k)"))
    assert validator.is_valid(normal_policy(0.02))


def test_schema_rejects_list() -> None:
    assert not schema_validator().is_valid(normal_policy([0.02]))


def test_schema_accepts_int_expression() -> None:
    init = {"scheme": "dirac", "groups": "module.groups"}
    policy = {"rules": [{"match": {"param": "weight"}, "init": init}]}
    assert schema_validator().is_valid(policy)


def test_schema_rejects_text_var() -> None:
    policy = {"vars": {"k": "2"}, "rules": [{"match": {}, "init": "zeros"}]}
    assert not schema_validator().is_valid(policy)


def test_loader_agrees_with_schema() -> None:
    accepted = load_policy(text=policy_text("0.02 / sqrt(k)"))
    assert accepted.rules[0].init.expressions["std"].text == "0.02 / sqrt(k)"
    listed = (
        "rules:\n  - match: {param: weight}\n    init: {scheme: normal, std: [1]}\n"
    )
    with pytest.raises(PolicyError):
        load_policy(text=listed)


def test_huge_integer_result_is_an_error() -> None:
    policy = load_policy(text=policy_text("10**200 * 10**200"))
    with pytest.raises(PlanError, match="gives a value beyond 1e\\+300"):
        initrules.apply(nn.Linear(4, 3), policy, seed=0)


def test_deeply_nested_expression_is_a_policy_error() -> None:
    with pytest.raises(PolicyError, match="is nested too deeply"):
        load_policy(text=policy_text("-" * 990 + "0.1"))


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"nope": 1}, "var 'nope' is not declared in the policy's 'vars'"),
        ({"k": 10**400}, "var 'k' must be a finite number that fits a float"),
        ({"k": "2"}, "var 'k' must be a number, got str"),
    ],
    ids=["undeclared", "huge", "string"],
)
def test_bad_vars_are_policy_errors(variables: dict[str, object], message: str) -> None:
    policy = load_policy(text=policy_text("k / 100"))
    with pytest.raises(PolicyError, match=message):
        initrules.apply(nn.Linear(4, 3), policy, seed=0, vars=variables)


def test_optional_integer_arguments_take_expressions() -> None:
    text = (
        "rules:\n"
        "  - match: {param: weight}\n"
        "    init: {scheme: kaiming_normal, fan_in: 'module.in_features * 4'}\n"
        "  - match: {param: bias}\n"
        "    init: zeros\n"
    )
    report = initrules.apply(nn.Linear(64, 3), load_policy(text=text), seed=0)
    assert report.row("weight").args["fan_in"] == 256
