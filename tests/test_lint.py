"""Check lint findings, their output formats, docs/rules.md and the CI examples.

Every code in ``initrules.lint.CODES`` has a fixture in tests/fixtures/lint/
named ``<code>-<name>.yaml`` that triggers that code and no other. Fixtures
for the model codes (IR2xx) name a factory of tests/lint_models.py in their
first line, such as ``# model: tests.lint_models:tiny_mlp``. The test builds
that model on the meta device, as ``initrules lint --model`` does.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from torch import nn

from initrules.factory import build_model
from initrules.formats import render
from initrules.lint import CODES, Finding, lint_path

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = REPO_ROOT / "tests" / "fixtures" / "lint"
RULES_DOC = REPO_ROOT / "docs" / "rules.md"
CODE_IDS = [f"{code}-{lint_code.name}" for code, lint_code in CODES.items()]
MODEL_COMMENT = "# model: "

# The text lines (str(finding)) of each fixture; "{path}" stands for the
# fixture's path, also where a message names a rule's position.
EXPECTED_LINES = {
    "IR001": [
        "{path}:6:36: IR001 unknown key 'mdoe' in 'init' of rule 1; valid keys: "
        "scheme, a, fan_in, fan_out, fans, mode, nonlinearity"
    ],
    "IR002": [
        "{path}:4:5: IR002 lint_ignore of rule 1 'convolutions' silences IR104 "
        "without a reason; write why, as in 'lint_ignore: {IR104: <reason>}'"
    ],
    "IR003": [
        "{path}:4:5: IR003 lint_ignore of rule 1 'convolutions' names 'IR401', "
        "which is not a lint code; valid codes: IR001, IR002, IR003, IR101, IR102, "
        "IR103, IR104, IR105, IR106, IR201, IR202, IR203, IR204, IR205"
    ],
    "IR101": [
        "{path}:7:5: IR101 rule 2 'biases' can never win: rule 1 'everything' at "
        "{path}:4:5 matches every parameter first; move this rule above it or "
        "delete it"
    ],
    "IR102": [
        "{path}:7:5: IR102 rule 2 'norm scales again' has the same match as rule 1 "
        "'norm scales' at {path}:4:5, so it never wins; delete it or change its "
        "predicates"
    ],
    "IR103": [
        "{path}:4:5: IR103 the regex '(blocks\\\\.\\\\d*\\\\.)*\\\\w*' of rule 1 "
        "'block weights' matches the empty name; use '+' instead of '*' where a "
        "segment must be present"
    ],
    "IR104": [
        "{path}:4:5: IR104 rule 1 'linear weights' sets a=0.2 but "
        "nonlinearity='relu', which ignores it; use nonlinearity: leaky_relu or "
        "drop 'a'"
    ],
    "IR105": [
        "{path}:4:5: IR105 rule 1 'embeddings' uses trunc_normal with std=0.02, "
        "a=-2.0, b=2.0: the bounds lie 100 std or more from the mean, so nothing "
        "is truncated; a and b are absolute values, not multiples of std (for two "
        "std, write a: -0.04, b: 0.04)"
    ],
    "IR106": [
        "{path}:4:5: IR106 rule 1 'linear weights' names the class "
        "'torch.nn.Linaer', which cannot be imported; check the module path, or "
        "use the bare class name"
    ],
    "IR201": [
        "{path}:1:1: IR201 parameter '2.bias' (Linear, shape 2) matches no rule; "
        "add a rule for it"
    ],
    "IR202": [
        "{path}:8:5: IR202 rule 2 'norm scales' matches no tensor of the model; "
        "fix its predicates or delete it"
    ],
    "IR203": [
        "{path}:11:5: IR203 rule 3 'output bias' matches 1 tensor(s), all won by "
        "earlier rules: rule 2 'biases' (1 tensor); move it up, narrow the earlier "
        "rules, or delete it"
    ],
    "IR204": [
        "{path}:5:5: IR204 rule 1 'first layer' cannot initialize "
        "'0.bias' (shape (8,), float32): xavier_uniform needs a tensor with at "
        "least 2 dimensions, got 1-D; narrow the rule's match (for example with "
        "'ndim' or 'param') or add an earlier rule for this tensor"
    ],
    "IR205": [
        "{path}:9:5: IR205 'head.weight' is tied to 'embed.weight', which rule 1 "
        "'embeddings' initializes; rule 2 'linear weights' would win "
        "'head.weight' but is not used for it"
    ],
}

# A model for the examples of each model code in docs/rules.md, which
# describes these models in prose.
DOC_EXAMPLE_MODELS = {
    "IR201": "tests.lint_models:tiny_mlp",
    "IR202": "tests.lint_models:tiny_mlp",
    "IR203": "tests.lint_models:tiny_mlp",
    "IR204": "tests.lint_models:tiny_mlp",
    "IR205": "tests.lint_models:tied_lm",
}


@pytest.fixture(autouse=True)
def repo_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # Model references are written as tests.lint_models:..., which imports
    # only with the repository root on sys.path.
    monkeypatch.syspath_prepend(str(REPO_ROOT))


def fixture_path(code: str) -> Path:
    return FIXTURES / f"{code}-{CODES[code].name}.yaml"


def model_for(path: Path) -> nn.Module | None:
    first_line = path.read_text(encoding="utf-8").splitlines()[0]
    if not first_line.startswith(MODEL_COMMENT):
        return None
    return build_model(first_line.removeprefix(MODEL_COMMENT), {}, device="meta")


def lint_fixture(code: str) -> list[Finding]:
    path = fixture_path(code)
    return lint_path(path, model=model_for(path))


def expected_lines(code: str) -> list[str]:
    path = str(fixture_path(code))
    return [line.replace("{path}", path) for line in EXPECTED_LINES[code]]


def write(tmp_path: Path, text: str, name: str = "policy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --- fixtures: one per code -----------------------------------------------------------


def test_fixtures_cover_every_code() -> None:
    names = sorted(path.name for path in FIXTURES.glob("*.yaml"))
    assert names == sorted(f"{code_id}.yaml" for code_id in CODE_IDS)
    assert sorted(EXPECTED_LINES) == sorted(CODES)


def test_model_codes_name_their_model() -> None:
    for code in CODES:
        first_line = fixture_path(code).read_text(encoding="utf-8").splitlines()[0]
        names_model = first_line.startswith(MODEL_COMMENT)
        assert names_model == code.startswith("IR2"), fixture_path(code).name


@pytest.mark.parametrize("code", list(CODES), ids=CODE_IDS)
def test_fixture_text_lines(code: str) -> None:
    findings = lint_fixture(code)
    assert [str(finding) for finding in findings] == expected_lines(code)


@pytest.mark.parametrize("code", list(CODES), ids=CODE_IDS)
def test_fixture_triggers_only_its_code(code: str) -> None:
    findings = lint_fixture(code)
    assert findings
    assert {finding.code for finding in findings} == {code}
    assert {finding.name for finding in findings} == {CODES[code].name}
    assert {finding.severity for finding in findings} == {CODES[code].severity}


@pytest.mark.parametrize("code", list(CODES), ids=CODE_IDS)
def test_fixture_json(code: str) -> None:
    findings = lint_fixture(code)
    records = json.loads(render(findings, "json"))
    assert isinstance(records, list)
    assert len(records) == len(findings)
    for record, finding in zip(records, findings, strict=True):
        assert record == {
            "path": str(fixture_path(code)),
            "line": finding.line,
            "column": finding.column,
            "code": code,
            "name": CODES[code].name,
            "severity": CODES[code].severity,
            "message": finding.message,
        }


@pytest.mark.parametrize("code", list(CODES), ids=CODE_IDS)
def test_fixture_sarif(code: str) -> None:
    findings = lint_fixture(code)
    log = json.loads(render(findings, "sarif"))
    assert log["version"] == "2.1.0"
    assert log["$schema"] == "https://json.schemastore.org/sarif-2.1.0.json"
    assert len(log["runs"]) == 1
    run = log["runs"][0]
    driver = run["tool"]["driver"]
    assert driver["name"] == "initrules"
    assert [rule["id"] for rule in driver["rules"]] == list(CODES)
    assert [rule["name"] for rule in driver["rules"]] == [
        lint_code.name for lint_code in CODES.values()
    ]
    results = run["results"]
    assert len(results) == len(findings)
    for result, finding in zip(results, findings, strict=True):
        assert result["ruleId"] == code
        assert result["level"] == CODES[code].severity
        assert result["message"]["text"] == finding.message
        assert len(result["locations"]) == 1
        location = result["locations"][0]["physicalLocation"]
        assert location["artifactLocation"]["uri"] == fixture_path(code).as_uri()
        assert location["region"] == {
            "startLine": finding.line,
            "startColumn": finding.column,
        }


@pytest.mark.parametrize("code", list(CODES), ids=CODE_IDS)
def test_fixture_github(code: str) -> None:
    findings = lint_fixture(code)
    lines = render(findings, "github").splitlines()
    severity = CODES[code].severity
    title = f"{code} {CODES[code].name}"
    expected = []
    for text in expected_lines(code):
        prefix, _, message = text.partition(f": {code} ")
        path, line, column = prefix.rsplit(":", 2)
        expected.append(
            f"::{severity} file={path},line={line},col={column},title={title}"
            f"::{message}"
        )
    assert lines == expected


# --- output formats -------------------------------------------------------------------


def test_github_escapes_data_and_properties() -> None:
    finding = Finding(
        path="odd,dir:x/100%.yaml",
        line=3,
        column=7,
        code="IR104",
        message="50% of a: b, c\r\nnext line",
    )
    assert render([finding], "github") == (
        "::warning file=odd%2Cdir%3Ax/100%25.yaml,line=3,col=7,"
        "title=IR104 kaiming-a-ignored::50%25 of a: b, c%0D%0Anext line"
    )


def test_github_error_annotation() -> None:
    finding = Finding("p.yaml", 1, 1, "IR201", "parameter 'x' matches no rule")
    assert render([finding], "github") == (
        "::error file=p.yaml,line=1,col=1,title=IR201 unmatched-tensor"
        "::parameter 'x' matches no rule"
    )


def test_text_summary_counts_severities() -> None:
    findings = [
        Finding("p.yaml", 1, 1, "IR201", "first"),
        Finding("p.yaml", 4, 5, "IR202", "second"),
        Finding("p.yaml", 9, 5, "IR202", "third"),
    ]
    assert render(findings, "text").splitlines() == [
        "p.yaml:1:1: IR201 first",
        "p.yaml:4:5: IR202 second",
        "p.yaml:9:5: IR202 third",
        "Found 3 finding(s): 1 error(s), 2 warning(s).",
    ]


def test_no_findings_in_each_format() -> None:
    assert render([], "text") == "All checks passed."
    assert json.loads(render([], "json")) == []
    assert render([], "github") == ""
    assert json.loads(render([], "sarif"))["runs"][0]["results"] == []


def test_sarif_rules_carry_names_and_levels() -> None:
    log = json.loads(render([], "sarif"))
    for rule in log["runs"][0]["tool"]["driver"]["rules"]:
        assert rule["name"] == CODES[rule["id"]].name
        assert rule["shortDescription"]["text"] == CODES[rule["id"]].summary
        assert rule["defaultConfiguration"]["level"] == CODES[rule["id"]].severity


def test_sarif_relative_path_is_relative_uri() -> None:
    finding = Finding("policies/my policy.yaml", 1, 1, "IR101", "message")
    location = json.loads(render([finding], "sarif"))["runs"][0]["results"][0][
        "locations"
    ][0]["physicalLocation"]
    assert location["artifactLocation"]["uri"] == "policies/my%20policy.yaml"


# --- ordering and suppressions --------------------------------------------------------

# Rule 2 comes after a catch-all (IR101) and sets Kaiming's `a` with relu
# (IR104). Rule 3 has the same two findings and names a class that does not
# exist (IR106).
MANY_FINDINGS = """\
version: 1
rules:
  - name: all
    match: {}
    init: {scheme: normal, std: 0.02}
  - name: leaky
    match: {module: Linear, param: weight}
    init: {scheme: kaiming_normal, a: 0.1, nonlinearity: relu}
  - name: missing class
    match: {module: nowhere.Block, param: weight}
    init: {scheme: kaiming_normal, a: 0.1, nonlinearity: tanh}
"""


def test_findings_sorted_by_position_and_code(tmp_path: Path) -> None:
    findings = lint_path(write(tmp_path, MANY_FINDINGS))
    keys = [(f.path, f.line, f.column, f.code) for f in findings]
    assert keys == sorted(keys)
    assert [(f.line, f.column, f.code) for f in findings] == [
        (6, 5, "IR101"),
        (6, 5, "IR104"),
        (9, 5, "IR101"),
        (9, 5, "IR104"),
        (9, 5, "IR106"),
    ]


def test_findings_sorted_across_rules_and_file(tmp_path: Path) -> None:
    text = MANY_FINDINGS.replace("version: 1\n", "version: 1\nlint_ignore: {X1: y}\n")
    findings = lint_path(write(tmp_path, text))
    assert [(f.line, f.column, f.code) for f in findings] == [
        (1, 1, "IR003"),
        (7, 5, "IR101"),
        (7, 5, "IR104"),
        (10, 5, "IR101"),
        (10, 5, "IR104"),
        (10, 5, "IR106"),
    ]


def test_rule_suppression_silences_that_rule_only(tmp_path: Path) -> None:
    text = MANY_FINDINGS.replace(
        "nonlinearity: relu}\n",
        'nonlinearity: relu}\n    lint_ignore: {IR104: "slope kept from the paper"}\n',
    )
    findings = lint_path(write(tmp_path, text))
    assert [(f.line, f.code, f.rule_index) for f in findings] == [
        (6, "IR101", 1),
        (10, "IR101", 2),
        (10, "IR104", 2),
        (10, "IR106", 2),
    ]


def test_file_suppression_silences_every_rule(tmp_path: Path) -> None:
    text = MANY_FINDINGS.replace(
        "version: 1\n", 'version: 1\nlint_ignore: {IR104: "slopes reviewed"}\n'
    )
    findings = lint_path(write(tmp_path, text))
    assert [(f.line, f.code) for f in findings] == [
        (7, "IR101"),
        (10, "IR101"),
        (10, "IR106"),
    ]


def test_file_suppression_of_model_code(tmp_path: Path) -> None:
    text = fixture_path("IR202").read_text(encoding="utf-8")
    text = text.replace("version: 1\n", 'version: 1\nlint_ignore: {IR202: "shared"}\n')
    model = model_for(fixture_path("IR202"))
    assert lint_path(write(tmp_path, text), model=model) == []


@pytest.mark.parametrize(
    "reason",
    ["", "null", "'   '"],
    ids=["empty-value", "null", "whitespace"],
)
def test_suppression_without_reason(tmp_path: Path, reason: str) -> None:
    text = MANY_FINDINGS.replace(
        "nonlinearity: relu}\n",
        f"nonlinearity: relu}}\n    lint_ignore:\n      IR104: {reason}\n",
    )
    path = write(tmp_path, text)
    findings = [f for f in lint_path(path) if f.code in ("IR002", "IR104")]
    assert [str(f) for f in findings] == [
        f"{path}:6:5: IR002 lint_ignore of rule 2 'leaky' silences IR104 without a "
        "reason; write why, as in 'lint_ignore: {IR104: <reason>}'",
        f"{path}:11:5: IR104 rule 3 'missing class' sets a=0.1 but "
        "nonlinearity='tanh', which ignores it; use nonlinearity: leaky_relu or "
        "drop 'a'",
    ]


def test_file_suppression_without_reason(tmp_path: Path) -> None:
    text = MANY_FINDINGS.replace("version: 1\n", "version: 1\nlint_ignore:\n  IR104:\n")
    path = write(tmp_path, text)
    findings = [f for f in lint_path(path) if f.code in ("IR002", "IR104")]
    assert [str(f) for f in findings] == [
        f"{path}:1:1: IR002 lint_ignore of the file silences IR104 without a "
        "reason; write why, as in 'lint_ignore: {IR104: <reason>}'"
    ]


@pytest.mark.parametrize(
    "code",
    ["IR999", "ir104", "IR1", "E501"],
    ids=["unused", "lowercase", "prefix", "foreign"],
)
def test_unknown_code_in_file_suppression(tmp_path: Path, code: str) -> None:
    text = f'version: 1\nlint_ignore: {{{code}: "a reason"}}\n' + MANY_FINDINGS[11:]
    path = write(tmp_path, text)
    findings = [f for f in lint_path(path) if f.code == "IR003"]
    assert [str(f) for f in findings] == [
        f"{path}:1:1: IR003 lint_ignore of the file names {code!r}, which is not a "
        f"lint code; valid codes: {', '.join(CODES)}"
    ]


def test_suppression_does_not_hide_invalid_policy(tmp_path: Path) -> None:
    text = (
        'version: 1\nlint_ignore: {IR001: "x"}\n'
        "rules: [{match: {nmae: a}, init: ones}]\n"
    )
    findings = lint_path(write(tmp_path, text))
    assert [(f.line, f.column, f.code) for f in findings] == [(3, 18, "IR001")]


# --- a policy run against a model it was not written for ------------------------------


def test_gpt2_policy_on_renamed_projections(tmp_path: Path) -> None:
    policy = tmp_path / "gpt2.yaml"
    shutil.copy(REPO_ROOT / "policies" / "gpt2.yaml", policy)
    model = build_model(
        "tests.lint_models:gpt2_renamed_projections", {"n_layer": 12}, device="meta"
    )
    findings = lint_path(policy, model=model)

    lines = policy.read_text(encoding="utf-8").splitlines()
    rule_line = lines.index("  - name: residual projections") + 1
    dead = [f for f in findings if f.code == "IR202"]
    assert [str(f) for f in dead] == [
        f"{policy}:{rule_line}:5: IR202 rule 1 'residual projections' matches no "
        "tensor of the model; fix its predicates or delete it"
    ]

    unmatched = [f for f in findings if f.code == "IR201"]
    names = {re.search(r"parameter '([^']+)'", f.message)[1] for f in unmatched}
    assert names == {
        f"transformer.h.{layer}.{block}.out_proj.weight"
        for layer in range(12)
        for block in ("attn", "mlp")
    }
    assert len(unmatched) == 24
    assert str(unmatched[0]) == (
        f"{policy}:1:1: IR201 parameter 'transformer.h.0.attn.out_proj.weight' "
        "(ResidualProjection, shape 8x8) matches no rule; add a rule for it"
    )
    assert {f.code for f in findings} == {"IR201", "IR202"}


def test_gpt2_policy_is_clean_on_gpt2(tmp_path: Path) -> None:
    model = build_model(
        "transformers:GPT2LMHeadModel",
        {"n_embd": 8, "n_head": 2, "vocab_size": 32, "n_positions": 16},
        device="meta",
    )
    assert lint_path(REPO_ROOT / "policies" / "gpt2.yaml", model=model) == []


def test_rule_for_tied_name_only_is_not_dead(tmp_path: Path) -> None:
    # Rule 2 matches head.weight, the second name of embed.weight, and
    # nothing else: the finding is IR205, not IR202.
    text = """\
version: 1
rules:
  - match: {module: Embedding}
    init: {scheme: normal, std: 0.02}
  - name: output head
    match: {name: head.weight}
    init: {scheme: normal, std: 0.05}
  - match: {module: Linear, param: weight}
    init: {scheme: normal, std: 0.05}
  - match: {param: bias}
    init: zeros
"""
    path = write(tmp_path, text)
    findings = lint_path(path, model=build_model("tests.lint_models:tied_lm", {}))
    assert [str(f) for f in findings] == [
        f"{path}:5:5: IR205 'head.weight' is tied to 'embed.weight', which rule 1 "
        "initializes; rule 2 'output head' would win 'head.weight' but is not used "
        "for it"
    ]


# --- docs/rules.md --------------------------------------------------------------------

SEVERITY_LINE = re.compile(r"^Severity: (error|warning)\.", re.MULTILINE)
YAML_BLOCK = re.compile(r"^```yaml\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def read_doc() -> str:
    return RULES_DOC.read_text(encoding="utf-8")


def doc_sections(text: str) -> dict[str, str]:
    """Map each second-level heading to the text under it."""
    parts = re.split(r"^## (.+)$", text, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def code_sections() -> dict[str, str]:
    sections = {}
    for heading, body in doc_sections(read_doc()).items():
        if re.match(r"IR\d", heading):
            sections[heading.split()[0]] = body
    return sections


def test_doc_has_a_section_per_code() -> None:
    sections = code_sections()
    assert sorted(sections) == sorted(CODES)


def test_doc_headings_name_no_unknown_code() -> None:
    headings = re.findall(r"^#+ (.*)$", read_doc(), flags=re.MULTILINE)
    named = {code for heading in headings for code in re.findall(r"IR\d+", heading)}
    assert named - set(CODES) == set()


def test_doc_headings_use_code_names() -> None:
    headings = [h for h in doc_sections(read_doc()) if re.match(r"IR\d", h)]
    assert headings == [f"{code} {lint_code.name}" for code, lint_code in CODES.items()]


@pytest.mark.parametrize("code", list(CODES), ids=CODE_IDS)
def test_doc_section_parts(code: str) -> None:
    body = code_sections()[code]
    severity = SEVERITY_LINE.search(body)
    assert severity is not None
    assert severity[1] == CODES[code].severity
    for part in ("**What it finds.**", "**Why it matters.**", "**Example.**"):
        assert part in body
    assert "**Instead.**" in body
    assert len(YAML_BLOCK.findall(body)) == 2


@pytest.mark.parametrize("code", list(CODES), ids=CODE_IDS)
def test_doc_examples_lint_as_described(tmp_path: Path, code: str) -> None:
    example, instead = YAML_BLOCK.findall(code_sections()[code])
    reference = DOC_EXAMPLE_MODELS.get(code)
    model = build_model(reference, {}, device="meta") if reference else None
    found = lint_path(write(tmp_path, example, "example.yaml"), model=model)
    assert code in {finding.code for finding in found}
    fixed = lint_path(write(tmp_path, instead, "instead.yaml"), model=model)
    assert [str(finding) for finding in fixed] == []


def test_doc_suppression_example_is_clean(tmp_path: Path) -> None:
    intro = read_doc().split("\n## IR", 1)[0]
    (example,) = YAML_BLOCK.findall(intro)
    assert lint_path(write(tmp_path, example)) == []


# --- pre-commit hook and CI workflow --------------------------------------------------


def test_pre_commit_hook_definition() -> None:
    hooks = yaml.safe_load((REPO_ROOT / ".pre-commit-hooks.yaml").read_text())
    assert isinstance(hooks, list)
    (hook,) = hooks
    assert hook["id"] == "initrules-lint"
    assert hook["entry"] == "initrules lint"
    assert hook["language"] == "python"
    assert isinstance(hook["name"], str)
    files = re.compile(hook["files"])
    assert files.search("policies/gpt2.yaml")
    assert files.search("models/policies/cnn.yml")
    assert not files.search("policies/README.md")
    assert not files.search(".github/workflows/ci.yaml")


def test_ci_workflow_lints_and_uploads_sarif() -> None:
    workflow = yaml.safe_load((REPO_ROOT / "examples/ci/lint-policies.yml").read_text())
    # YAML 1.1, which PyYAML reads, turns the bare key `on` into True.
    triggers = workflow.get("on", workflow.get(True))
    assert {"push", "pull_request"} <= set(triggers)
    (job,) = workflow["jobs"].values()
    assert job["permissions"]["security-events"] == "write"
    steps = job["steps"]
    commands = [step.get("run", "") for step in steps]
    uses = [step.get("uses", "") for step in steps]

    torch_install = next(i for i, run in enumerate(commands) if "torch==2.13.0" in run)
    assert "download.pytorch.org/whl/cpu" in commands[torch_install]
    project_install = next(
        i for i, run in enumerate(commands) if re.search(r"pip install [-\w ]*\.", run)
    )
    lint = next(
        i
        for i, run in enumerate(commands)
        if "initrules lint policies/ --format sarif > initrules.sarif" in run
    )
    upload = next(
        i
        for i, use in enumerate(uses)
        if use.startswith("github/codeql-action/upload-sarif@")
    )
    assert torch_install < project_install < lint < upload
    assert steps[upload]["with"]["sarif_file"] == "initrules.sarif"
    # The upload must run even when lint exits 1 on findings.
    assert steps[lint].get("continue-on-error") is True
    assert steps[upload]["if"] == "always()"


def test_runaway_regex_against_model_is_a_finding(tmp_path: Path) -> None:
    model = nn.Module()
    model.add_module("a" * 200, nn.Linear(2, 2))
    path = tmp_path / "slow.yaml"
    path.write_text("rules:\n  - match: {regex: '(a|a)+b'}\n    init: zeros\n")
    findings = lint_path(path, model=model)
    assert [finding.code for finding in findings] == ["IR001"]
    assert "timed out after 0.25 s" in findings[0].message


def test_unmatched_tensors_keep_module_order(tmp_path: Path) -> None:
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(12)])
    path = tmp_path / "biases.yaml"
    path.write_text("rules:\n  - match: {param: bias}\n    init: zeros\n")
    names = [finding.message.split("'")[1] for finding in lint_path(path, model=model)]
    assert names == [f"{index}.weight" for index in range(12)]


def lint_text(tmp_path: Path, text: str, model: nn.Module | None = None) -> list[str]:
    path = tmp_path / "policy.yaml"
    path.write_text(text, encoding="utf-8")
    return [
        str(finding).removeprefix(f"{path}:")
        for finding in lint_path(path, model=model)
    ]


def test_final_catch_all_is_not_shadowed(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    text = (
        "rules:\n"
        "  - {match: {param: weight}, init: ones}\n"
        "  - {match: {param: bias}, init: zeros}\n"
        "  - {name: rest, match: {}, init: keep}\n"
    )
    assert lint_text(tmp_path, text, model) == []


@pytest.mark.parametrize(
    "catch_all", ["{}", "{name: '**'}", "{param: '*'}", "{regex: '.*'}"]
)
def test_catch_all_forms_hide_later_rules(tmp_path: Path, catch_all: str) -> None:
    text = (
        f"rules:\n  - {{match: {catch_all}, init: zeros}}\n"
        "  - {match: {param: bias}, init: ones}\n"
    )
    findings = lint_text(tmp_path, text)
    assert [line.split()[1] for line in findings] == ["IR101"]


def test_rule_after_catch_all_is_not_also_shadowed(tmp_path: Path) -> None:
    text = (
        "rules:\n  - {match: {}, init: zeros}\n  - {match: {param: bias}, init: ones}\n"
    )
    codes = [line.split()[1] for line in lint_text(tmp_path, text, nn.Linear(2, 2))]
    assert codes == ["IR101"]


def test_duplicate_match_ignores_list_order(tmp_path: Path) -> None:
    text = (
        "rules:\n"
        "  - {match: {module: [LayerNorm, Linear], param: weight}, init: ones}\n"
        "  - {match: {module: [Linear, LayerNorm], param: weight}, init: zeros}\n"
    )
    assert [line.split()[1] for line in lint_text(tmp_path, text)] == ["IR102"]


def test_rule_for_tied_name_only_is_explained(tmp_path: Path) -> None:
    model = build_model("tests.lint_models:tied_lm", {}, device="meta")
    text = (
        "rules:\n"
        "  - {match: {param: weight}, init: ones}\n"
        "  - {match: {param: bias}, init: zeros}\n"
        "  - {name: head, match: {name: head.weight}, init: zeros}\n"
    )
    findings = lint_text(tmp_path, text, model)
    assert findings == [
        "4:5: IR205 rule 3 'head' matches only 'head.weight', a tied name of "
        "'embed.weight'; a tied tensor is initialized by the rule for its first "
        "name, so match 'embed.weight' instead"
    ]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("torch.nn.Linaer", "cannot be imported"),
        ("os.path", "is not a class"),
        ("no_such_package_xyz.Thing", "cannot be imported"),
    ],
    ids=["typo", "not-a-class", "missing-package"],
)
def test_unknown_module_class(tmp_path: Path, spec: str, message: str) -> None:
    text = f"rules:\n  - {{match: {{module: {spec}}}, init: zeros}}\n"
    assert lint_text(tmp_path, text) == [
        f"2:5: IR106 rule 1 names the class {spec!r}, which {message}; check the "
        "module path, or use the bare class name"
    ]


def test_lint_never_imports_a_new_package(tmp_path: Path) -> None:
    # `this` prints the Zen of Python on import; lint must not run it.
    import sys

    assert "this" not in sys.modules
    text = "rules:\n  - {match: {module: this.Thing}, init: zeros}\n"
    assert lint_text(tmp_path, text) == []
    assert "this" not in sys.modules


@pytest.mark.parametrize(("mode", "count"), [("error", 2), ("warn", 2), ("keep", 0)])
def test_unmatched_follows_on_unmatched(tmp_path: Path, mode: str, count: int) -> None:
    text = (
        f"on_unmatched: {mode}\nrules:\n  - {{match: {{param: weight}}, init: ones}}\n"
    )
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    codes = [line.split()[1] for line in lint_text(tmp_path, text, model)]
    assert codes == ["IR201"] * count
