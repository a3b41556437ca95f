from pathlib import Path

import pytest
import torch

import initrules
from initrules import PolicyError, load_policy
from initrules.schemes import KaimingArgs

VALID = """\
version: 1
name: demo
description: A small policy.
on_unmatched: warn
rules:
  - name: convolutions
    match: {module: [Conv2d, Conv1d], param: weight}
    init: {scheme: kaiming_normal, mode: fan_out, nonlinearity: relu}
  - match:
      param: bias
    init: zeros
"""


def write(tmp_path: Path, text: str, name: str = "policy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_valid_policy_loads(tmp_path: Path) -> None:
    policy = load_policy(write(tmp_path, VALID))
    assert policy.name == "demo"
    assert policy.on_unmatched == "warn"
    assert [rule.init.scheme for rule in policy.rules] == ["kaiming_normal", "zeros"]
    assert policy.rules[0].match.module == ["Conv2d", "Conv1d"]


def test_scheme_arguments_get_defaults(tmp_path: Path) -> None:
    args = load_policy(write(tmp_path, VALID)).rules[0].init.args
    assert args == KaimingArgs(a=0.0, mode="fan_out", nonlinearity="relu")


def test_rules_know_their_position(tmp_path: Path) -> None:
    path = write(tmp_path, VALID)
    policy = load_policy(path)
    assert policy.path == str(path)
    assert str(policy.rules[0].location) == f"{path}:6:5"
    assert str(policy.rules[1].location) == f"{path}:9:5"


def test_text_policy_path_is_placeholder() -> None:
    policy = load_policy(text=VALID)
    assert policy.path == "<text>"
    assert str(policy.rules[1].location) == "<text>:9:5"


def test_path_and_text_are_exclusive(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="exactly one of path or text"):
        load_policy(write(tmp_path, VALID), text=VALID)
    with pytest.raises(TypeError, match="exactly one of path or text"):
        load_policy()


BASE = "rules:\n  - match: {param: weight}\n    init: zeros\n"

# (policy text, message after the "path:" prefix)
BAD_TEXT = [
    (
        "unknown-key",
        "rules:\n  - match: {nmae: weight}\n    init: zeros\n",
        "2:13: unknown key 'nmae' in 'match' of rule 1; valid keys: chunk, "
        "chunk_dim, dtype, exact, kind, module, name, ndim, param, regex, within",
    ),
    (
        "unknown-top-level-key",
        "rule:\n  - match: {}\n    init: zeros\n",
        "1:1: unknown key 'rule' in the policy; valid keys: checks, description, "
        "extends, lint_ignore, name, on_unmatched, rules, vars, version",
    ),
    (
        "duplicate-key",
        "rules:\n  - match: {param: weight}\n    init: zeros\n    init: ones\n",
        "4:5: invalid YAML: duplicate key 'init' (first defined on line 3)",
    ),
    (
        "regex-does-not-compile",
        "rules:\n  - match: {regex: 'h\\.(\\d+'}\n    init: zeros\n",
        "2:20: 'match.regex' of rule 1: invalid regex 'h\\\\.(\\\\d+': missing ) at"
        " position 7",
    ),
    (
        "unknown-scheme",
        "rules:\n  - match: {param: weight}\n    init: {scheme: kaiming}\n",
        "3:20: 'init.scheme' of rule 1: unknown scheme 'kaiming'; valid schemes: "
        "constant, default, dirac, eye, kaiming_normal, kaiming_uniform, keep, "
        "lecun_normal, lsuv, normal, ones, orthogonal, pretrained, sparse, "
        "trunc_normal, uniform, variance_scaling, xavier_normal, xavier_uniform, zeros",
    ),
    (
        "unknown-bare-scheme",
        "rules:\n  - match: {param: weight}\n    init: zero\n",
        "3:11: 'init.scheme' of rule 1: unknown scheme 'zero'; valid schemes: "
        "constant, default, dirac, eye, kaiming_normal, kaiming_uniform, keep, "
        "lecun_normal, lsuv, normal, ones, orthogonal, pretrained, sparse, "
        "trunc_normal, uniform, variance_scaling, xavier_normal, xavier_uniform, zeros",
    ),
    (
        "argument-not-taken",
        "rules:\n  - match: {param: weight}\n    init: {scheme: normal, gain: 2}\n",
        "3:28: unknown key 'gain' in 'init' of rule 1; valid keys: scheme, mean, std",
    ),
    (
        "argument-bad-value",
        "rules:\n  - match: {param: weight}\n"
        "    init: {scheme: kaiming_normal, mode: fan_avg}\n",
        "3:42: 'init.mode' of rule 1: input should be 'fan_in' or 'fan_out', "
        "got 'fan_avg'",
    ),
    (
        "argument-unknown-name",
        "rules:\n  - match: {param: weight}\n    init: {scheme: normal, std: 'wide'}\n",
        "3:33: 'init.std' of rule 1: unknown name 'wide' in 'wide'; names defined "
        "here: fan_in, fan_out, numel, shape (declare others under 'vars', or name "
        "a group of the rule's regex)",
    ),
    (
        "negative-std",
        "rules:\n  - match: {param: weight}\n    init: {scheme: normal, std: -1}\n",
        "3:33: 'init.std' of rule 1: input should be greater than or equal to "
        "0, got -1",
    ),
    (
        "uniform-bounds-reversed",
        "rules:\n  - match: {param: weight}\n    init: {scheme: uniform, a: 1, b: 0}\n",
        "3:11: 'init' of rule 1: a (1.0) must not be greater than b (0.0)",
    ),
    (
        "two-documents",
        "rules: []\n---\nrules: []\n",
        "2:1: invalid YAML: but found another document (expected a single document "
        "in the stream)",
    ),
    (
        "alias-expansion",
        "a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n"
        + "".join(
            f"a{level}: &a{level} [{', '.join([f'*a{level - 1}'] * 10)}]\n"
            for level in range(1, 7)
        )
        + "rules: []\n",
        "5:5: invalid YAML: the document expands to more than 100,000 nodes through "
        "aliases",
    ),
    (
        "exact-without-module",
        "rules:\n  - match: {exact: true}\n    init: zeros\n",
        "2:12: 'match' of rule 1: 'exact' applies to 'module'; add 'module' or drop "
        "'exact'",
    ),
    (
        "param-with-dot",
        "rules:\n  - match: {param: attn.weight}\n    init: zeros\n",
        "2:20: 'match.param' of rule 1: invalid param 'attn.weight': param is the "
        "tensor's local name (weight, bias), which has no dots; use 'name' for "
        "dotted names",
    ),
    (
        "missing-init",
        "rules:\n  - match: {param: weight}\n",
        "2:5: missing required key 'init' in rule 1",
    ),
    (
        "missing-argument",
        "rules:\n  - match: {param: weight}\n    init: constant\n",
        "3:11: missing required key 'val' in 'init' of rule 1",
    ),
    (
        "top-level-list",
        "- match: {param: weight}\n  init: zeros\n",
        "1:1: expected a mapping with 'rules' at the top level, found a list",
    ),
    (
        "top-level-scalar",
        "just text\n",
        "1:1: expected a mapping with 'rules' at the top level, found a string",
    ),
    (
        "broken-yaml",
        "rules: [\n  {match: {param: weight}\n",
        "3:1: invalid YAML: expected ',' or '}', but got '<stream end>' (while "
        "parsing a flow mapping)",
    ),
    (
        "python-tag",
        "rules:\n  - match: !!python/object:os.system {}\n    init: zeros\n",
        "2:12: invalid YAML: the tag 'tag:yaml.org,2002:python/object:os.system' is "
        "not allowed in a policy",
    ),
    (
        "bad-glob",
        "rules:\n  - match: {name: 'h..weight'}\n    init: zeros\n",
        "2:19: 'match.name' of rule 1: invalid glob: pattern 'h..weight' has an"
        " empty segment (a leading, trailing or doubled dot)",
    ),
    (
        "name-and-regex",
        "rules:\n  - match: {name: a, regex: a}\n    init: zeros\n",
        "2:12: 'match' of rule 1: give either 'name' (a glob) or 'regex', not both",
    ),
    (
        "bad-dtype",
        "rules:\n  - match: {dtype: float}\n    init: zeros\n",
        "2:20: 'match.dtype.0' of rule 1: input should be 'float16', "
        "'bfloat16', 'float32', 'float64', 'complex64', 'complex128', 'uint8', "
        "'int8', 'int16', 'int32', 'int64' or 'bool', got 'float'",
    ),
    (
        "bad-on-unmatched",
        "on_unmatched: ignore\n" + BASE,
        "1:15: 'on_unmatched': input should be 'error', 'warn' or 'keep', got 'ignore'",
    ),
    (
        "several-errors",
        "rules:\n  - match: {nmae: weight}\n  - match: {}\n",
        "2:13: unknown key 'nmae' in 'match' of rule 1; valid keys: chunk, "
        "chunk_dim, dtype, exact, kind, module, name, ndim, param, regex, within "
        "(and 2 more errors)",
    ),
]


@pytest.mark.parametrize(
    ("text", "message"),
    [case[1:] for case in BAD_TEXT],
    ids=[case[0] for case in BAD_TEXT],
)
def test_bad_policy_message(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(PolicyError) as excinfo:
        load_policy(path)
    assert str(excinfo.value) == f"{path}:{message}"
    line, column = message.split(":")[:2]
    assert (excinfo.value.line, excinfo.value.column) == (int(line), int(column))
    assert excinfo.value.path == str(path)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(PolicyError) as excinfo:
        load_policy(path)
    assert str(excinfo.value) == f"{path}: policy file not found"


def test_empty_file(tmp_path: Path) -> None:
    path = write(tmp_path, "# only a comment\n")
    with pytest.raises(PolicyError) as excinfo:
        load_policy(path)
    assert str(excinfo.value) == (
        f"{path}:1:1: expected a mapping with 'rules' at the top level, found an empty "
        "document"
    )


def test_nul_character_has_position() -> None:
    with pytest.raises(PolicyError) as excinfo:
        load_policy(text="rules: []\nname: a\x00b\n")
    assert str(excinfo.value) == (
        "<text>:2:8: invalid YAML: the character U+0000 is not allowed"
    )


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"name: caf\xe9\nrules: []\n")
    with pytest.raises(PolicyError, match="cannot read policy file") as excinfo:
        load_policy(path)
    assert excinfo.value.path == str(path)


def test_apply_never_parses_path_as_yaml(tmp_path: Path) -> None:
    import torch

    missing = str(tmp_path / "policy.yml")
    with pytest.raises(PolicyError) as excinfo:
        initrules.apply(torch.nn.Linear(2, 2), missing)
    assert str(excinfo.value) == f"{missing}: policy file not found"


@pytest.mark.parametrize(
    "text", [case[1] for case in BAD_TEXT], ids=[case[0] for case in BAD_TEXT]
)
def test_bad_policy_leaves_model_untouched(tmp_path: Path, text: str) -> None:
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    before = {name: value.clone() for name, value in model.state_dict().items()}
    with pytest.raises(PolicyError):
        initrules.apply(model, write(tmp_path, text))
    after = model.state_dict()
    for name, value in before.items():
        assert torch.equal(after[name], value), f"{name} changed"


def test_merge_keys_override() -> None:
    policy = load_policy(
        text=(
            "rules:\n"
            "  - match: {param: weight}\n"
            "    init: &base {scheme: normal, std: 0.02}\n"
            "  - match: {param: bias}\n"
            "    init: {<<: *base, std: 0.0}\n"
            "  - match: {param: gain}\n"
            "    init: {<<: [*base, {std: 0.9, mean: 1.0}]}\n"
        )
    )
    args = [rule.init.args.model_dump() for rule in policy.rules]
    assert args[0] == {"mean": 0.0, "std": 0.02}
    assert args[1] == {"mean": 0.0, "std": 0.0}
    assert args[2] == {"mean": 1.0, "std": 0.02}


# YAML 1.2 scalars: what a policy author writes is what the policy gets.
NUMBERS = [
    ("2e-2", 0.02),
    ("1.0e3", 1000.0),
    ("-1.5E+1", -15.0),
    (".5", 0.5),
    ("1_000", 1000),
    ("010", 10),
    ("0x10", 16),
    ("0o17", 15),
]


@pytest.mark.parametrize(("text", "value"), NUMBERS, ids=[text for text, _ in NUMBERS])
def test_yaml_numbers(text: str, value: float) -> None:
    policy = load_policy(
        text=f"rules:\n  - match: {{}}\n    init: {{scheme: constant, val: {text}}}\n"
    )
    assert policy.rules[0].init.args.model_dump() == {"val": value}


@pytest.mark.parametrize("text", ["on", "off", "yes", "no", "1:30"])
def test_yaml_words_stay_strings(text: str) -> None:
    policy = load_policy(text=f"name: {text}\nrules: []\n")
    assert policy.name == text


def test_yaml_text_given_as_path_gets_hint() -> None:
    text = "rules:\n  - match: {}\n    init: zeros\n"
    with pytest.raises(PolicyError) as excinfo:
        initrules.apply(torch.nn.Linear(2, 2), text)
    assert str(excinfo.value) == (
        f"{text}: policy file not found; to load YAML text, use load_policy(text=...)"
    )


@pytest.mark.parametrize("escape", ["\\U800010000", "\\U100010000"])
def test_out_of_range_escape_is_policy_error(escape: str) -> None:
    with pytest.raises(PolicyError) as excinfo:
        load_policy(text=f'rules: []\nname: "{escape}"\n')
    assert excinfo.value.line == 2
    assert str(excinfo.value).startswith("<text>:2:")
