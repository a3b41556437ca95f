"""Test the ``initrules`` command line: lint, explain, apply and schema.

Some cases run the real command in a subprocess: those in
``SUBPROCESS_CASES`` as ``python -m initrules``, and one through the
``initrules`` executable next to ``sys.executable``. They cover each exit
code, ``explain``, and ``apply`` with its state dict loaded back in this
process. Each such process spends seconds importing torch, so the ``runs``
fixture starts them all together before the module's first test, and their
tests come last in this file. The other checks call
``initrules.cli.main``, the function the console script calls, in this
process, with the same arguments.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import initrules
from initrules.cli import main
from initrules.lint import CODES

REPO_ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 180

CLEAN = """\
version: 1
rules:
  - match: {module: Linear, param: weight}
    init: {scheme: kaiming_uniform, a: 2.23606797749979}
  - match: {param: bias}
    init: zeros
"""

# Rule 2 comes after a catch-all: IR101, an error.
ERRORS = """\
version: 1
rules:
  - match: {}
    init: {scheme: normal, std: 0.02}
  - match: {param: bias}
    init: zeros
"""

# Kaiming's `a` with relu: IR104, a warning.
WARNINGS = """\
version: 1
rules:
  - match: {module: Linear, param: weight}
    init: {scheme: kaiming_uniform, a: 0.2, nonlinearity: relu}
  - match: {param: bias}
    init: zeros
"""

# IR104 on rule 1, IR101 on rule 2.
MIXED = """\
version: 1
rules:
  - match: {}
    init: {scheme: kaiming_uniform, a: 0.2, nonlinearity: relu}
  - match: {param: bias}
    init: zeros
"""

# IR103, a warning.
EMPTY_REGEX = """\
version: 1
rules:
  - match: {regex: '\\w*'}
    init: {scheme: normal, std: 0.02}
"""

# For tests.lint_models:tiny_mlp, three rules match 0.weight.
EXPLAIN = """\
version: 1
rules:
  - name: first layer
    match: {name: "0.weight"}
    init: {scheme: normal, std: 0.1}
  - name: linear weights
    match: {module: Linear, param: weight}
    init: {scheme: xavier_uniform, gain: 1.0}
  - name: all weights
    match: {param: weight}
    init: {scheme: normal, std: 0.02}
  - name: biases
    match: {param: bias}
    init: zeros
"""

# For tests.lint_models:tiny_mlp, no rule matches 2.bias. Rules 1 to 3 each
# fail on one predicate of it; rule 4 fails on two.
EXPLAIN_UNMATCHED = """\
version: 1
on_unmatched: warn
rules:
  - name: linear weights
    match: {module: Linear, param: weight}
    init: {scheme: normal, std: 0.02}
  - name: first bias
    match: {name: "0.bias"}
    init: zeros
  - name: norm biases
    match: {module: LayerNorm, param: bias}
    init: zeros
  - name: conv weights
    match: {module: Conv2d, param: weight}
    init: {scheme: normal, std: 0.02}
"""

LOCAL_MODELS = """\
from torch import nn


def mlp():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
"""

GPT2_CONFIG = {
    "n_layer": 2,
    "n_embd": 8,
    "n_head": 2,
    "vocab_size": 32,
    "n_positions": 16,
    "bos_token_id": 31,
    "eos_token_id": 31,
}
GPT2_ARGS = [
    argument
    for key, value in GPT2_CONFIG.items()
    for argument in ("--model-arg", f"{key}={value}")
]
TINY_MLP = ["--model", "tests.lint_models:tiny_mlp"]

# Policy for a Llama built from LlamaConfig: every parameter is covered, and
# the bias rule is dead because the default config has no biases.
LLAMA = """\
version: 1
rules:
  - name: projections and embeddings
    match: {module: [Linear, Embedding], param: weight}
    init: {scheme: normal, std: 0.02}
  - name: norm scales
    match: {module: "*RMSNorm", param: weight}
    init: ones
  - name: biases
    match: {param: bias}
    init: zeros
"""

# Case name -> arguments of `python -m initrules`, run in the workspace. The
# longest case comes first.
SUBPROCESS_CASES = {
    "apply-gpt2": [
        "apply",
        "gpt2.yaml",
        "--model",
        "transformers:GPT2LMHeadModel",
        *GPT2_ARGS,
        "--seed",
        "0",
        "--out",
        "state.pt",
    ],
    "lint-errors": ["lint", "errors.yaml"],
    "lint-unimportable-model": [
        "lint",
        "clean.yaml",
        "--model",
        "no_such_module:build",
    ],
    "explain-three-rules": [
        "explain",
        "explain.yaml",
        "--model",
        "tests.lint_models:meta_only_mlp",
        "--param",
        "0.weight",
    ],
}


def write_workspace(root: Path) -> Path:
    files = {
        "clean.yaml": CLEAN,
        "errors.yaml": ERRORS,
        "warnings.yaml": WARNINGS,
        "mixed.yaml": MIXED,
        "explain.yaml": EXPLAIN,
        "unmatched.yaml": EXPLAIN_UNMATCHED,
        "llama.yaml": LLAMA,
        "local_models.py": LOCAL_MODELS,
        "tree/a.yaml": EMPTY_REGEX,
        "tree/sub/b.yml": WARNINGS,
        "tree/notes.txt": "not a policy\n",
    }
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    shutil.copy(REPO_ROOT / "policies" / "gpt2.yaml", root / "gpt2.yaml")
    return root


def run_process(
    command: list[str], cwd: Path, *, pythonpath: bool = True
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    if pythonpath:
        # Makes tests.lint_models importable from the workspace.
        env["PYTHONPATH"] = str(REPO_ROOT)
    return subprocess.run(
        command,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


def executable() -> Path:
    return Path(sys.executable).with_name("initrules")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_workspace(tmp_path_factory.mktemp("cli"))


Runs = dict[str, "Future[subprocess.CompletedProcess[str]]"]


@pytest.fixture(scope="module", autouse=True)
def runs(workspace: Path) -> Iterator[Runs]:
    """Start every subprocess case; tests wait for the result they need."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        futures = {
            name: pool.submit(
                run_process, [sys.executable, "-m", "initrules", *args], workspace
            )
            for name, args in SUBPROCESS_CASES.items()
        }
        # The console script, without PYTHONPATH: local_models.py is found
        # only because it sits in the working directory.
        futures["executable"] = pool.submit(
            run_process,
            [str(executable()), "lint", "clean.yaml", "--model", "local_models:mlp"],
            workspace,
            pythonpath=False,
        )
        yield futures


@pytest.fixture
def in_workspace(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Run main() in the workspace, with sys.path restored afterwards."""
    monkeypatch.chdir(workspace)
    monkeypatch.setattr(sys, "path", [str(REPO_ROOT), *sys.path])
    yield workspace


def run_main(
    capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, list[str], str]:
    """Call main() like the console script: exit code, stdout lines, stderr."""
    try:
        code = main(list(args))
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    out, err = capsys.readouterr()
    return code, out.splitlines(), err


# --- lint: exit codes and options, through main() -------------------------------------


def test_warnings_alone_exit_0(
    in_workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_main(capsys, "lint", "warnings.yaml")
    assert code == 0
    assert out == [
        "warnings.yaml:3:5: IR104 rule 1 sets a=0.2 but nonlinearity='relu', which "
        "ignores it; use nonlinearity: leaky_relu or drop 'a'",
        "Found 1 finding(s): 0 error(s), 1 warning(s).",
    ]


def test_fail_on_warning(
    in_workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_main(capsys, "lint", "warnings.yaml", "--fail-on", "warning")
    assert code == 1
    assert out[-1] == "Found 1 finding(s): 0 error(s), 1 warning(s)."


def test_fail_on_never(in_workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(capsys, "lint", "errors.yaml", "--fail-on", "never")
    assert code == 0
    assert out[-1] == "Found 1 finding(s): 1 error(s), 0 warning(s)."


def test_fail_on_error_ignores_warnings(
    in_workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, _ = run_main(capsys, "lint", "warnings.yaml", "--fail-on", "error")
    assert code == 0
    code, _, _ = run_main(capsys, "lint", "mixed.yaml", "--fail-on", "error")
    assert code == 1


@pytest.mark.parametrize(
    ("options", "codes", "exit_code"),
    [
        ([], ["IR104", "IR101"], 1),
        (["--select", "IR104"], ["IR104"], 0),
        (["--ignore", "IR101"], ["IR104"], 0),
        (["--select", "ir1", "--ignore", "IR104"], ["IR101"], 1),
        (["--select", "IR101,IR104", "--ignore", "IR1"], [], 0),
    ],
    ids=["all", "select", "ignore", "select-prefix-ignore", "ignore-wins"],
)
def test_select_and_ignore(
    in_workspace: Path,
    capsys: pytest.CaptureFixture[str],
    options: list[str],
    codes: list[str],
    exit_code: int,
) -> None:
    code, out, _ = run_main(capsys, "lint", "mixed.yaml", *options)
    assert [line.split()[1] for line in out[:-1]] == codes
    assert code == exit_code


@pytest.mark.parametrize(
    ("pattern", "lines"),
    [
        ("tree", ["tree/a.yaml:3:5: IR103", "tree/sub/b.yml:3:5: IR104"]),
        ("tree/*.yaml", ["tree/a.yaml:3:5: IR103"]),
        ("tree/**/*.yml", ["tree/sub/b.yml:3:5: IR104"]),
    ],
    ids=["folder", "glob", "recursive-glob"],
)
def test_folders_and_globs(
    in_workspace: Path,
    capsys: pytest.CaptureFixture[str],
    pattern: str,
    lines: list[str],
) -> None:
    code, out, _ = run_main(capsys, "lint", pattern)
    assert code == 0
    assert [" ".join(line.split()[:2]) for line in out[:-1]] == lines


def test_findings_of_several_files_sorted(
    in_workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, out, _ = run_main(capsys, "lint", "warnings.yaml", "errors.yaml", "tree")
    assert [line.split(": ")[0] for line in out[:-1]] == [
        "errors.yaml:5:5",
        "tree/a.yaml:3:5",
        "tree/sub/b.yml:3:5",
        "warnings.yaml:3:5",
    ]


@pytest.mark.parametrize("output_format", ["json", "sarif", "github"])
def test_formats_through_cli(
    in_workspace: Path, capsys: pytest.CaptureFixture[str], output_format: str
) -> None:
    code, out, _ = run_main(capsys, "lint", "mixed.yaml", "--format", output_format)
    assert code == 1
    if output_format == "json":
        records = json.loads("\n".join(out))
        assert [(r["path"], r["line"], r["code"]) for r in records] == [
            ("mixed.yaml", 3, "IR104"),
            ("mixed.yaml", 5, "IR101"),
        ]
    elif output_format == "sarif":
        results = json.loads("\n".join(out))["runs"][0]["results"]
        assert [(r["ruleId"], r["level"]) for r in results] == [
            ("IR104", "warning"),
            ("IR101", "error"),
        ]
    else:
        assert [line.split("::")[1] for line in out] == [
            "warning file=mixed.yaml,line=3,col=5,title=IR104 kaiming-a-ignored",
            "error file=mixed.yaml,line=5,col=5,title=IR101 unreachable-rule",
        ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["lint", "missing.yaml"],
            "initrules lint: error: missing.yaml: policy file not found",
        ),
        (
            ["lint", "nothing/*.yaml"],
            "initrules lint: error: no policy files match 'nothing/*.yaml'",
        ),
        (
            ["lint", "clean.yaml", "--model", "no_such_module:build"],
            "initrules lint: error: cannot import module 'no_such_module': No module "
            "named 'no_such_module'",
        ),
        (
            ["lint", "clean.yaml", "--model", "tests.lint_models:no_such_factory"],
            "initrules lint: error: module 'tests.lint_models' has no attribute "
            "'no_such_factory'",
        ),
        (
            ["lint", "clean.yaml", *TINY_MLP, "--model-arg", "width=3"],
            "initrules lint: error: cannot build 'tests.lint_models:tiny_mlp': "
            "TypeError: tiny_mlp() got an unexpected keyword argument 'width'",
        ),
        (
            ["lint", "clean.yaml", "--model", "tests.lint_models"],
            "initrules lint: error: invalid model reference 'tests.lint_models': "
            "expected MODULE:FACTORY, as in 'transformers:GPT2LMHeadModel' or "
            "'my_models.cnn:build'",
        ),
        (
            ["explain", "missing.yaml", *TINY_MLP],
            "initrules explain: error: missing.yaml: policy file not found",
        ),
        (
            ["explain", "explain.yaml", *TINY_MLP, "--param", "3.*"],
            "initrules explain: error: no tensor of the model matches '3.*'",
        ),
        (
            ["apply", "missing.yaml", *TINY_MLP],
            "initrules apply: error: missing.yaml: policy file not found",
        ),
        (
            ["apply", "clean.yaml", "--model", "tests.lint_models:meta_only_mlp"],
            "initrules apply: error: cannot build 'tests.lint_models:meta_only_mlp': "
            "RuntimeError: meta_only_mlp was built outside the meta device",
        ),
        (
            ["apply", "clean.yaml", *TINY_MLP, "--out", "no/such/folder/state.pt"],
            "initrules apply: error: cannot write no/such/folder/state.pt: the folder "
            "does not exist",
        ),
        (
            ["apply", "clean.yaml", *TINY_MLP, "--out", "."],
            "initrules apply: error: cannot write '.': expected a file name",
        ),
        (
            ["lint", "clean.yaml", "--select", "IR2"],
            "initrules lint: error: the selected codes (IR2xx) need a model; add "
            "--model MODULE:FACTORY",
        ),
        (
            ["explain", "explain.yaml", *TINY_MLP, "--param", "["],
            "initrules explain: error: invalid --param glob: pattern '[' has '[' "
            "without a closing ']'",
        ),
        (
            ["lint", "clean.yaml", "--model", "../models:build"],
            "initrules lint: error: invalid module name '../models': expected a "
            "dotted import path such as my_models.cnn, not a file path",
        ),
        (
            [
                "lint",
                "clean.yaml",
                "--model",
                "transformers:GPT2LMHeadModel",
                "--model-arg",
                "n_layers=2",
            ],
            "initrules lint: error: unknown field(s) of GPT2Config: n_layers; check "
            "the spelling against the config class",
        ),
    ],
    ids=[
        "missing-file",
        "glob-matches-nothing",
        "unimportable-model",
        "missing-factory",
        "bad-model-arg",
        "reference-without-colon",
        "explain-missing-policy",
        "explain-no-tensor",
        "apply-missing-policy",
        "factory-raises",
        "out-folder-missing",
        "out-is-folder",
        "model-codes-without-model",
        "bad-param-glob",
        "file-path-as-module",
        "misspelled-config-field",
    ],
)
def test_usage_errors_exit_2(
    in_workspace: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    code, out, err = run_main(capsys, *args)
    assert code == 2
    assert out == []
    assert err.splitlines() == [message]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["lint", "--colour", "clean.yaml"], "unrecognized arguments: --colour"),
        (
            ["lint", "--select", "IR999", "clean.yaml"],
            "argument --select: unknown code 'IR999'; valid codes: " + ", ".join(CODES),
        ),
        (
            ["lint", "--ignore", "X1", "clean.yaml"],
            "argument --ignore: unknown code 'X1'",
        ),
        (["lint", "--fail-on", "info", "clean.yaml"], "argument --fail-on: invalid"),
        (["lint"], "the following arguments are required: FILE"),
        (["explain", "explain.yaml"], "the following arguments are required: --model"),
        (["frobnicate"], "argument COMMAND: invalid choice: 'frobnicate'"),
        (
            ["lint", "--select", "", "clean.yaml"],
            "argument --select: expected at least one code, as in IR101",
        ),
    ],
    ids=[
        "bad-option",
        "unknown-select-code",
        "unknown-ignore-code",
        "bad-fail-on",
        "no-file",
        "explain-without-model",
        "unknown-command",
        "empty-select",
    ],
)
def test_argument_errors_exit_2(
    in_workspace: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    code, out, err = run_main(capsys, *args)
    assert code == 2
    assert out == []
    assert message in err.splitlines()[-1]


# --- lint against a model, through main() ---------------------------------------------


def test_model_built_on_meta_device(
    in_workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_main(
        capsys, "lint", "clean.yaml", "--model", "tests.lint_models:meta_only_mlp"
    )
    assert code == 0, err
    assert out == ["All checks passed."]


def test_model_findings_exit_1(
    in_workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_main(capsys, "lint", "unmatched.yaml", *TINY_MLP)
    assert code == 1
    assert out == [
        "unmatched.yaml:1:1: IR201 parameter '2.bias' (Linear, shape 2) matches no "
        "rule; add a rule for it",
        "unmatched.yaml:10:5: IR202 rule 3 'norm biases' matches no tensor of the "
        "model; fix its predicates or delete it",
        "unmatched.yaml:13:5: IR202 rule 4 'conv weights' matches no tensor of the "
        "model; fix its predicates or delete it",
        "Found 3 finding(s): 1 error(s), 2 warning(s).",
    ]


def test_lint_llama_from_config(
    in_workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Two layers of the default 7B config: on the CPU its embedding and
    # output head alone take about 1 GiB (2 x 32000 x 4096 float32 values),
    # on the meta device nothing.
    code, out, err = run_main(
        capsys,
        "lint",
        "llama.yaml",
        "--model",
        "transformers:LlamaForCausalLM",
        "--model-arg",
        "num_hidden_layers=2",
    )
    assert code == 0, err
    assert out == [
        "llama.yaml:9:5: IR202 rule 3 'biases' matches no tensor of the model; fix "
        "its predicates or delete it",
        "Found 1 finding(s): 0 error(s), 1 warning(s).",
    ]


def test_lint_llama_model_args_reach_config(
    in_workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_main(
        capsys,
        "lint",
        "llama.yaml",
        "--model",
        "transformers:LlamaForCausalLM",
        "--model-arg",
        "num_hidden_layers=1",
        "--model-arg",
        "attention_bias=true",
        "--model-arg",
        "hidden_act=silu",
    )
    assert code == 0, err
    assert out == ["All checks passed."]


# --- explain, through main() ----------------------------------------------------------


def test_explain_every_tensor(
    in_workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_main(capsys, "explain", "explain.yaml", *TINY_MLP)
    assert code == 0
    assert out == [
        "0.weight (Linear, 8x4, float32)",
        "  winner: rule 1 'first layer' at explain.yaml:3:5",
        "    init: normal(mean=0.0, std=0.1)",
        "  also matched: rule 2 'linear weights' at explain.yaml:6:5",
        "  also matched: rule 3 'all weights' at explain.yaml:9:5",
        "0.bias (Linear, 8, float32)",
        "  winner: rule 4 'biases' at explain.yaml:12:5",
        "    init: zeros()",
        "2.weight (Linear, 2x8, float32)",
        "  winner: rule 2 'linear weights' at explain.yaml:6:5",
        "    init: xavier_uniform(gain=1.0, fans=torch)",
        "  also matched: rule 3 'all weights' at explain.yaml:9:5",
        "2.bias (Linear, 2, float32)",
        "  winner: rule 4 'biases' at explain.yaml:12:5",
        "    init: zeros()",
    ]


def test_explain_unmatched_shows_near_misses(
    in_workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_main(
        capsys, "explain", "unmatched.yaml", *TINY_MLP, "--param", "2.bias"
    )
    assert code == 0
    assert out == [
        "2.bias (Linear, 2, float32)",
        "  no rule matched",
        "  rule 1 'linear weights' at unmatched.yaml:4:5 fails only on param "
        "(tensor has bias)",
        "  rule 2 'first bias' at unmatched.yaml:7:5 fails only on name "
        "(tensor has 2.bias)",
        "  rule 3 'norm biases' at unmatched.yaml:10:5 fails only on module "
        "(tensor has Linear)",
    ]


# --- schema and help, through main() --------------------------------------------------


@pytest.mark.parametrize(
    "options", [[], ["--builtin-only"]], ids=["plain", "builtin-only"]
)
def test_schema_prints_policy_json_schema(
    capsys: pytest.CaptureFixture[str], options: list[str]
) -> None:
    code, out, _ = run_main(capsys, "schema", *options)
    assert code == 0
    assert json.loads("\n".join(out)) == initrules.policy_json_schema()


HELP_OPTIONS = {
    "lint": [
        "FILE",
        "--model",
        "--model-arg",
        "--format",
        "--select",
        "--ignore",
        "--fail-on",
        "github,json,sarif,text",
        "error,warning,never",
    ],
    "explain": ["POLICY", "--model", "--model-arg", "--param"],
    "apply": ["POLICY", "--model", "--model-arg", "--seed", "--out"],
    "schema": ["--builtin-only"],
}


@pytest.mark.parametrize("command", list(HELP_OPTIONS))
def test_help_mentions_every_option(
    capsys: pytest.CaptureFixture[str], command: str
) -> None:
    code, out, _ = run_main(capsys, command, "--help")
    assert code == 0
    assert out[0].startswith(f"usage: initrules {command} ")
    text = "\n".join(out)
    for option in [*HELP_OPTIONS[command], "--help"]:
        assert option in text, option


def test_main_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(capsys, "--help")
    assert code == 0
    text = "\n".join(out)
    for word in ["lint", "explain", "apply", "schema", "--verbose"]:
        assert word in text, word


# --- the real command, in subprocesses started by the `runs` fixture ------------------


def test_executable_lints_clean_policy(runs: Runs) -> None:
    assert executable().is_file()
    result = runs["executable"].result()
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["All checks passed."]
    assert result.stderr == ""


def test_errors_exit_1(runs: Runs) -> None:
    result = runs["lint-errors"].result()
    assert result.returncode == 1, result.stderr
    assert result.stdout.splitlines() == [
        "errors.yaml:5:5: IR101 rule 2 can never win: rule 1 at errors.yaml:3:5 "
        "matches every parameter first; move this rule above it or delete it",
        "Found 1 finding(s): 1 error(s), 0 warning(s).",
    ]


def test_unimportable_model_exits_2(runs: Runs) -> None:
    result = runs["lint-unimportable-model"].result()
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "initrules lint: error: cannot import module 'no_such_module': No module "
        "named 'no_such_module'"
    ]


def test_explain_lists_all_matching_rules(runs: Runs) -> None:
    result = runs["explain-three-rules"].result()
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "0.weight (Linear, 8x4, float32)",
        "  winner: rule 1 'first layer' at explain.yaml:3:5",
        "    init: normal(mean=0.0, std=0.1)",
        "  also matched: rule 2 'linear weights' at explain.yaml:6:5",
        "  also matched: rule 3 'all weights' at explain.yaml:9:5",
    ]


def build_gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(**GPT2_CONFIG))


def test_apply_saves_loadable_state_dict(runs: Runs, workspace: Path) -> None:
    result = runs["apply-gpt2"].result()
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    assert out[0] == "initrules: policy gpt2 (gpt2.yaml), seed 0"
    assert out[-3] == (
        "28 tensors initialized (2,144 elements), 0 kept, 0 unmatched, 0 skipped, "
        "0 buffers untouched"
    )
    assert out[-2] == "all checks passed"
    assert out[-1] == "saved the state dict to state.pt"

    state = torch.load(workspace / "state.pt", weights_only=True)
    fresh = build_gpt2()
    fresh.load_state_dict(state, strict=True)
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
    assert torch.equal(fresh.lm_head.weight, state["transformer.wte.weight"])
    assert torch.equal(state["lm_head.weight"], state["transformer.wte.weight"])

    # The same seed in this process gives the same values, tensor by tensor.
    expected = build_gpt2()
    initrules.apply(expected, workspace / "gpt2.yaml", seed=0)
    for name, tensor in expected.state_dict().items():
        assert torch.equal(state[name], tensor), name


def test_select_never_hides_invalid_policy(
    in_workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (in_workspace / "broken.yaml").write_text("rules: [\n", encoding="utf-8")
    code, out, _ = run_main(capsys, "lint", "broken.yaml", "--ignore", "IR0")
    assert code == 1
    assert out[0].split()[1] == "IR001"


def test_same_file_twice_is_linted_once(
    in_workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, once, _ = run_main(capsys, "lint", "mixed.yaml")
    _, twice, _ = run_main(capsys, "lint", "mixed.yaml", "./mixed.yaml", "mixed.yaml")
    assert twice == once


def test_existing_path_with_brackets_is_not_a_glob(
    in_workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copy(in_workspace / "clean.yaml", in_workspace / "x[1].yaml")
    code, out, _ = run_main(capsys, "lint", "x[1].yaml")
    assert code == 0
    assert out == ["All checks passed."]


def test_folder_skips_hidden_and_yaml_named_folders(
    in_workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = in_workspace / "clean_tree"
    (root / ".hidden").mkdir(parents=True)
    (root / ".hidden" / "broken.yaml").write_text("rules: [\n", encoding="utf-8")
    (root / "folder.yaml").mkdir()
    shutil.copy(in_workspace / "clean.yaml", root / "clean.yaml")
    code, out, _ = run_main(capsys, "lint", "clean_tree")
    assert code == 0
    assert out == ["All checks passed."]


def test_explain_shows_tied_names(
    in_workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (in_workspace / "tied.yaml").write_text(
        "rules:\n  - match: {}\n    init: zeros\n", encoding="utf-8"
    )
    code, out, _ = run_main(
        capsys,
        "explain",
        "tied.yaml",
        "--model",
        "tests.lint_models:tied_lm",
        "--param",
        "head.weight",
    )
    assert code == 0
    assert out[1] == (
        "  tied: also named head.weight; the rule for embed.weight initializes it"
    )


def test_model_kwarg_reaches_transformers_class(
    in_workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_main(
        capsys,
        "explain",
        str(REPO_ROOT / "policies" / "bert.yaml"),
        "--model",
        "transformers:BertModel",
        "--model-arg",
        "num_hidden_layers=1",
        "--model-kwarg",
        "add_pooling_layer=false",
        "--param",
        "**",
    )
    assert code == 0
    assert not any(line.startswith("pooler.") for line in out)
    assert any(line.startswith("embeddings.word_embeddings.weight") for line in out)


# --- apply: bad input through main() ---------------------------------------------


def test_apply_undeclared_var_is_usage_error(
    in_workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_main(capsys, "apply", "clean.yaml", *TINY_MLP, "--var", "n=1")
    assert code == 2
    assert err.startswith("initrules apply: error: clean.yaml: var 'n' is not declared")


def test_apply_infinite_var_is_usage_error(
    in_workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_main(capsys, "apply", "clean.yaml", *TINY_MLP, "--var", "n=inf")
    assert code == 2
    assert "invalid --var 'n=inf': the number must be finite" in err


def test_apply_lazy_model_reports_skipped_tensors(
    in_workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_main(
        capsys, "apply", "clean.yaml", "--model", "tests.lint_models:lazy_mlp"
    )
    assert code == 0
    assert any("2 skipped" in line for line in out), out


def test_explain_shows_blocks_and_resolved_expressions(
    capsys: pytest.CaptureFixture[str],
) -> None:
    lstm = str(REPO_ROOT / "policies" / "lstm.yaml")
    code, out, _ = run_main(
        capsys,
        "explain",
        lstm,
        "--model",
        "torch.nn:LSTM",
        "--model-arg",
        "input_size=4",
        "--model-arg",
        "hidden_size=8",
        "--param",
        "bias_ih_l0",
    )
    assert code == 0
    assert out[2:4] == [
        "    init [chunk 0 of 4, dim 0]: zeros() (by rule 5 'other biases' at "
        f"{lstm}:46:5)",
        "    init [chunk 1 of 4, dim 0]: ones()",
    ]
    gpt2 = str(REPO_ROOT / "policies" / "gpt2.yaml")
    code, out, _ = run_main(
        capsys,
        "explain",
        gpt2,
        "--model",
        "transformers:GPT2LMHeadModel",
        "--model-arg",
        "n_layer=8",
        "--param",
        "transformer.h.0.attn.c_proj.weight",
    )
    assert code == 0
    assert out[2] == (
        "    init: normal(mean=0.0, std=0.005 from 'config.initializer_range / "
        "sqrt(2 * config.n_layer)')"
    )
