"""Test the report exports (JSON, Markdown, PNG) and `apply --probe-input --plot`.

The in-process tests build real models and policies. The command-line cases
that need a fresh interpreter (a full run of the console script, or
matplotlib made unimportable) run as subprocesses. The ``runs`` fixture
starts them all before the module's first test, because each one spends
seconds importing torch, and their tests come last in this file. The other
command-line cases call ``initrules.cli.main``, the function the console
script calls, in this process.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import re
import struct
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import matplotlib.image
import numpy as np
import pytest
import torch
from torch import nn

import initrules
from initrules import Report
from initrules.cli import main

REPO_ROOT = Path(__file__).resolve().parents[1]
GPT2_POLICY = REPO_ROOT / "policies" / "gpt2.yaml"
ABSURD_POLICY = REPO_ROOT / "examples" / "absurd_init.yaml"
TIMEOUT_S = 180

# Colors that initrules.plot uses for tensors that passed and failed a check.
PASSED_RGB = (0x1F, 0x77, 0xB4)
FAILED_RGB = (0xD6, 0x27, 0x28)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

GPT2_CONFIG: dict[str, int] = {
    "n_layer": 2,
    "n_embd": 64,
    "n_head": 2,
    "vocab_size": 1000,
    "bos_token_id": 0,
    "eos_token_id": 0,
}
GPT2_ARGS = [
    argument
    for key, value in GPT2_CONFIG.items()
    for argument in ("--model-arg", f"{key}={value}")
]
LINEAR_ARGS = [
    "--model",
    "torch.nn:Linear",
    "--model-arg",
    "in_features=16",
    "--model-arg",
    "out_features=8",
]

LINEAR_POLICY = """\
version: 1
name: linear
rules:
  - name: linear weights
    match: {module: Linear, param: weight}
    init: {scheme: xavier_uniform}
  - match: {param: bias}
    init: zeros
"""

EMBEDDING_POLICY = """\
version: 1
name: embedding
rules:
  - match: {module: Embedding, param: weight}
    init: {scheme: normal, std: 0.02}
"""

CONV_POLICY = """\
version: 1
name: conv
rules:
  - match: {module: [Conv2d, Linear], param: weight}
    init: {scheme: kaiming_normal, nonlinearity: relu}
  - match: {param: bias}
    init: zeros
"""

# The factory module of the conv model, written into the workspace so that
# subprocesses import it through PYTHONPATH.
CONV_MODELS = """\
from torch import nn


def convnet():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 30 * 30, 10)
    )
"""

# A script that makes `import matplotlib` raise ImportError, as Python does
# for a module whose sys.modules entry is None, then calls Report.plot.
PLOT_WITHOUT_MATPLOTLIB = """\
import sys
sys.modules["matplotlib"] = None
import initrules
from torch import nn
report = initrules.apply(nn.Linear(16, 8), "linear.yaml", seed=0)
report.plot("no_matplotlib.png")
"""

CLI_WITHOUT_MATPLOTLIB = """\
import sys
sys.modules["matplotlib"] = None
from initrules.cli import main
sys.exit(main(sys.argv[1:]))
"""

# Case name -> command line. "initrules" stands for the console script next
# to sys.executable. The longest case comes first.
SUBPROCESS_CASES: dict[str, list[str]] = {
    "gpt2-probe-plot": [
        "initrules",
        "apply",
        str(GPT2_POLICY),
        "--model",
        "transformers:GPT2LMHeadModel",
        *GPT2_ARGS,
        "--seed",
        "0",
        "--probe-input",
        "ids:2x16",
        "--plot",
        "gpt2.png",
    ],
    "conv-probe": [
        "initrules",
        "apply",
        "conv.yaml",
        "--model",
        "report_export_models:convnet",
        "--probe-input",
        "1x3x32x32",
    ],
    "absurd-out": [
        "initrules",
        "apply",
        str(ABSURD_POLICY),
        *LINEAR_ARGS,
        "--out",
        "absurd.pt",
    ],
    "plot-no-matplotlib": [sys.executable, "-c", PLOT_WITHOUT_MATPLOTLIB],
    "cli-no-matplotlib": [
        sys.executable,
        "-c",
        CLI_WITHOUT_MATPLOTLIB,
        "apply",
        "linear.yaml",
        *LINEAR_ARGS,
        "--plot",
        "cli_no_matplotlib.png",
    ],
}

Runs = dict[str, "Future[subprocess.CompletedProcess[str]]"]


# --- helpers and fixtures ----------------------------------------------------------


def build_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(**GPT2_CONFIG))


def load_strict_json(text: str) -> Any:
    """Parse JSON, rejecting the NaN and Infinity literals that strict JSON lacks."""

    def reject(constant: str) -> None:
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=reject)


def markdown_section(text: str, title: str) -> list[str]:
    """Return the bullet items under the ``## title`` heading, without ``- ``."""
    lines = text.splitlines()
    start = lines.index(f"## {title}")
    items = []
    for line in lines[start + 2 :]:
        if not line.startswith("- "):
            break
        items.append(line.removeprefix("- "))
    return items


def table_rows(text: str) -> list[str]:
    """Return the lines of the Markdown table body (each starts with a tensor)."""
    return [line for line in text.splitlines() if line.startswith("| `")]


def split_cells(row: str) -> list[str]:
    """Split a Markdown table row on its unescaped pipes."""
    return re.split(r"(?<!\\)\|", row)[1:-1]


def png_size(path: Path) -> tuple[int, int]:
    """Return (width, height) from a PNG's IHDR chunk."""
    header = path.read_bytes()[:24]
    width, height = struct.unpack(">II", header[16:24])
    return width, height


def read_rgb(path: Path) -> np.ndarray:
    """Return the image as an (N, 3) array of floats in [0, 1]."""
    image = matplotlib.image.imread(path)
    return image[..., :3].reshape(-1, 3)


def count_color(pixels: np.ndarray, rgb: tuple[int, int, int]) -> int:
    """Count pixels within 2% of ``rgb`` on every channel."""
    target = np.array(rgb) / 255
    return int((np.abs(pixels - target).max(axis=1) < 0.02).sum())


def run_main(
    capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, list[str], list[str]]:
    """Call main() like the console script: exit code, stdout and stderr lines."""
    try:
        code = main(list(args))
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    out, err = capsys.readouterr()
    return code, out.splitlines(), err.splitlines()


def run_process(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(cwd))
    return subprocess.run(
        command,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("export")
    (root / "linear.yaml").write_text(LINEAR_POLICY, encoding="utf-8")
    (root / "conv.yaml").write_text(CONV_POLICY, encoding="utf-8")
    (root / "embedding.yaml").write_text(EMBEDDING_POLICY, encoding="utf-8")
    (root / "report_export_models.py").write_text(CONV_MODELS, encoding="utf-8")
    return root


@pytest.fixture(scope="module", autouse=True)
def runs(workspace: Path) -> Iterator[Runs]:
    """Start every subprocess case; tests wait for the result they need."""
    console_script = str(Path(sys.executable).with_name("initrules"))
    with ThreadPoolExecutor(max_workers=len(SUBPROCESS_CASES)) as pool:
        futures = {}
        for name, command in SUBPROCESS_CASES.items():
            if command[0] == "initrules":
                command = [console_script, *command[1:]]
            futures[name] = pool.submit(run_process, command, workspace)
        yield futures


@pytest.fixture
def in_workspace(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run main() in the workspace, with sys.path restored afterwards."""
    monkeypatch.chdir(workspace)
    monkeypatch.setattr(sys, "path", [str(workspace), *sys.path])
    return workspace


@pytest.fixture(scope="module")
def gpt2_report() -> Report:
    return initrules.apply(build_gpt2(), GPT2_POLICY, seed=0)


@pytest.fixture(scope="module")
def gpt2_probe_report() -> Report:
    ids = torch.randint(0, GPT2_CONFIG["vocab_size"], (2, 16))
    return initrules.apply(build_gpt2(), GPT2_POLICY, seed=0, probe_inputs=ids)


@pytest.fixture(scope="module")
def nonfinite_report() -> Report:
    """A check() report, with a probe, of a model with NaN, Inf and -Inf planted."""
    policy = initrules.load_policy(text=LINEAR_POLICY)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    initrules.apply(model, policy, seed=0)
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
        model[2].weight[0, 0] = float("inf")
        model[2].weight[0, 1] = float("-inf")
    return initrules.check(model, policy, probe_inputs=torch.ones(2, 16))


@pytest.fixture(scope="module")
def drift_report() -> Report:
    """A check() report where 0.weight has three times its drawn std."""
    policy = initrules.load_policy(
        text=LINEAR_POLICY.replace(
            "{scheme: xavier_uniform}", "{scheme: normal, std: 0.1}"
        )
    )
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    initrules.apply(model, policy, seed=0)
    with torch.no_grad():
        model[0].weight.mul_(3)
    return initrules.check(model, policy)


@pytest.fixture(scope="module")
def plots(
    tmp_path_factory: pytest.TempPathFactory,
    gpt2_report: Report,
    gpt2_probe_report: Report,
) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("plots")
    paths = {"plain": folder / "plain.png", "probe": folder / "probe.png"}
    gpt2_report.plot(paths["plain"])
    gpt2_probe_report.plot(paths["probe"])
    return paths


# --- to_json -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpt2_probe_report", "nonfinite_report"])
def test_json_file_matches_dict(
    name: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    report: Report = request.getfixturevalue(name)
    path = tmp_path / "report.json"
    text = report.to_json(path)
    written = path.read_text(encoding="utf-8")
    assert written == text
    assert load_strict_json(written) == json.loads(json.dumps(report.to_dict()))


def test_json_without_path_writes_nothing(
    gpt2_report: Report, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    text = gpt2_report.to_json()
    assert load_strict_json(text)["policy_name"] == "gpt2"
    assert list(tmp_path.iterdir()) == []


def test_json_nonfinite_as_strings(nonfinite_report: Report) -> None:
    rows = load_strict_json(nonfinite_report.to_json())["rows"]
    first, _, second, _ = rows
    assert first["name"] == "0.weight"
    assert first["mean"] == "nan"
    assert first["max"] == "nan"
    assert second["name"] == "2.weight"
    assert second["min"] == "-inf"
    assert second["max"] == "inf"


def test_json_probe_nonfinite(nonfinite_report: Report) -> None:
    probe = load_strict_json(nonfinite_report.to_json())["probe"]
    first = probe["records"][0]
    assert first["name"] == "0"
    assert first["mean"] == "nan"
    assert first["std"] == "nan"
    assert first["finite"] is False
    assert probe["first_nonfinite"] == "0"


def test_json_failures(nonfinite_report: Report) -> None:
    failures = load_strict_json(nonfinite_report.to_json())["failures"]
    assert [(f["check"], f["tensor"]) for f in failures] == [
        ("finite", "0.weight"),
        ("finite", "2.weight"),
        ("probe", "0"),
    ]
    assert [f["message"] for f in failures] == [
        failure.message for failure in nonfinite_report.failures
    ]
    assert "1 of 128 values are NaN or Inf" in failures[0]["message"]


# --- to_markdown -------------------------------------------------------------------


def test_markdown_title(gpt2_report: Report) -> None:
    lines = gpt2_report.to_markdown().splitlines()
    assert lines[0] == f"# initrules report: gpt2 ({GPT2_POLICY})"


def test_markdown_table(gpt2_report: Report) -> None:
    text = gpt2_report.to_markdown()
    lines = text.splitlines()
    header = "| tensor | shape | module | rule | scheme | mean | std | expected std |"
    start = lines.index(header)
    assert lines[start + 1] == "|---|---|---|---|---|---:|---:|---:|"
    rows = table_rows(text)
    assert len(rows) == len(gpt2_report.rows)
    assert len(rows) == 28
    assert lines[start + 2 : start + 2 + len(rows)] == rows
    assert [split_cells(row)[0].strip() for row in rows] == [
        f"`{row.name}`" + "".join(f" (= `{alias}`)" for alias in row.aliases)
        for row in gpt2_report.rows
    ]


def test_markdown_shows_tied_alias(gpt2_report: Report) -> None:
    assert "`transformer.wte.weight` (= `lm_head.weight`)" in gpt2_report.to_markdown()


def test_markdown_cells_per_row(gpt2_report: Report) -> None:
    for row in table_rows(gpt2_report.to_markdown()):
        assert len(split_cells(row)) == 8, row


def test_markdown_passed(gpt2_report: Report) -> None:
    text = gpt2_report.to_markdown()
    assert "; all checks passed." in text
    assert "## Failed checks" not in text
    assert "## Forward-pass probe" not in text


def test_markdown_probe(gpt2_probe_report: Report) -> None:
    assert gpt2_probe_report.probe is not None
    records = len(gpt2_probe_report.probe.records)
    items = markdown_section(gpt2_probe_report.to_markdown(), "Forward-pass probe")
    assert items == [f"{records} leaf module calls recorded"]


def test_markdown_failures(nonfinite_report: Report) -> None:
    text = nonfinite_report.to_markdown()
    assert "; 3 check(s) failed." in text
    items = markdown_section(text, "Failed checks")
    assert items == [failure.message for failure in nonfinite_report.failures]


def test_markdown_escapes_pipe() -> None:
    policy = initrules.load_policy(
        text=LINEAR_POLICY.replace("name: linear weights", "name: 'in|out'")
    )
    report = initrules.apply(nn.Linear(16, 8), policy, seed=0)
    weight_row = table_rows(report.to_markdown())[0]
    cells = [cell.strip() for cell in split_cells(weight_row)]
    assert len(cells) == 8
    assert cells[3] == "in\\|out (line 4)"


def test_markdown_newline_in_rule() -> None:
    policy = initrules.load_policy(
        text=LINEAR_POLICY.replace("name: linear weights", 'name: "in\\nout"')
    )
    report = initrules.apply(nn.Linear(16, 8), policy, seed=0)
    lines = report.to_markdown().splitlines()
    start = lines.index("|---|---|---|---|---|---:|---:|---:|") + 1
    body = lines[start:]
    assert len(body) == 2
    for line in body:
        assert len(split_cells(line)) == 8, line
    assert split_cells(body[0])[3].strip() == "in out (line 4)"


# --- plot --------------------------------------------------------------------------


def test_plot_writes_png(plots: dict[str, Path]) -> None:
    for path in plots.values():
        assert path.read_bytes()[:8] == PNG_SIGNATURE, path


def test_plot_size(plots: dict[str, Path]) -> None:
    plain_width, plain_height = png_size(plots["plain"])
    probe_width, probe_height = png_size(plots["probe"])
    assert plain_width >= 500
    assert plain_height >= 300
    assert probe_width > plain_width
    assert probe_height == plain_height


def test_plot_size_matches_imread(plots: dict[str, Path]) -> None:
    height, width, _ = matplotlib.image.imread(plots["plain"]).shape
    assert (width, height) == png_size(plots["plain"])


def test_plot_not_blank(plots: dict[str, Path]) -> None:
    pixels = read_rgb(plots["plain"])
    assert pixels.std() > 0.05
    assert len(np.unique(pixels, axis=0)) > 50


def test_plot_passed_points_blue(plots: dict[str, Path]) -> None:
    pixels = read_rgb(plots["plain"])
    assert count_color(pixels, PASSED_RGB) > 20
    assert count_color(pixels, FAILED_RGB) == 0


def test_plot_failed_point_red(drift_report: Report, tmp_path: Path) -> None:
    assert [f.tensor for f in drift_report.failures] == ["0.weight"]
    path = tmp_path / "drift.png"
    drift_report.plot(path)
    pixels = read_rgb(path)
    assert count_color(pixels, FAILED_RGB) > 20
    assert count_color(pixels, PASSED_RGB) > 20


def test_plot_without_expected_std(tmp_path: Path) -> None:
    policy = initrules.load_policy(text="rules:\n  - match: {}\n    init: keep\n")
    report = initrules.apply(nn.Linear(16, 8), policy, seed=0)
    assert [row.expected_std for row in report.rows] == [None, None]
    path = tmp_path / "keep.png"
    report.plot(path)
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert count_color(read_rgb(path), PASSED_RGB) == 0


def test_plot_empty_report(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    Report(policy_name="empty", policy_path="<text>", seed=None).plot(path)
    assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_plot_png_any_suffix(gpt2_report: Report, tmp_path: Path) -> None:
    path = tmp_path / "figure.out"
    gpt2_report.plot(str(path))
    assert path.read_bytes()[:8] == PNG_SIGNATURE


# --- apply --probe-input, in this process ----------------------------------------


INVALID_SHAPE = (
    "initrules apply: error: argument --probe-input: invalid shape {!r}: expected "
    "positive sizes joined by 'x', such as 1x3x224x224, or ids:1x128 for token ids"
)


# str.isdigit() is true for a superscript two and a fullwidth one, but int()
# rejects the first and both are outside the documented syntax.
@pytest.mark.parametrize(
    "shape", ["1xb", "0x3", "ids:", "1x3x", "ids:0", "\u00b2x3", "\uff11x3"]
)
def test_probe_shape_invalid(
    in_workspace: Path, capsys: pytest.CaptureFixture[str], shape: str
) -> None:
    code, out, err = run_main(
        capsys, "apply", "linear.yaml", *LINEAR_ARGS, "--probe-input", shape
    )
    assert code == 2
    assert out == []
    assert err[-1] == INVALID_SHAPE.format(shape)


def test_probe_ids_without_vocabulary(
    in_workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_main(
        capsys, "apply", "linear.yaml", *LINEAR_ARGS, "--probe-input", "ids:1x8"
    )
    assert code == 2
    assert out == []
    assert err == [
        "initrules apply: error: --probe-input ids:... needs the model's vocabulary "
        "size, but the model has no config.vocab_size and no nn.Embedding; give a "
        "float shape instead"
    ]


def test_probe_ids_from_embedding(
    in_workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_main(
        capsys,
        "apply",
        "embedding.yaml",
        "--model",
        "torch.nn:Embedding",
        "--model-arg",
        "num_embeddings=50",
        "--model-arg",
        "embedding_dim=4",
        "--probe-input",
        "ids:2x3",
    )
    assert code == 0, err
    assert "probe: 1 leaf module calls recorded, 0 flagged" in out


def test_probe_shape_mismatch(
    in_workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_main(
        capsys,
        "apply",
        "conv.yaml",
        "--model",
        "report_export_models:convnet",
        "--probe-input",
        "1x4x32x32",
    )
    assert code == 2
    assert out == []
    assert err[-1].startswith(
        "initrules apply: error: the forward-pass probe failed: RuntimeError: "
    )


# --- subprocesses (started before the first test) --------------------------------


def test_cli_gpt2_probe_plot(
    runs: Runs, workspace: Path, gpt2_probe_report: Report, plots: dict[str, Path]
) -> None:
    result = runs["gpt2-probe-plot"].result()
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert gpt2_probe_report.probe is not None
    records = len(gpt2_probe_report.probe.records)
    assert f"probe: {records} leaf module calls recorded, 0 flagged" in lines
    assert lines[-2:] == ["all checks passed", "wrote the plot to gpt2.png"]
    png = workspace / "gpt2.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    assert png_size(png)[0] > png_size(plots["plain"])[0]


def test_cli_conv_probe(runs: Runs) -> None:
    result = runs["conv-probe"].result()
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "probe: 4 leaf module calls recorded, 0 flagged" in lines
    assert lines[-1] == "all checks passed"


def test_cli_failed_checks(runs: Runs, workspace: Path) -> None:
    result = runs["absurd-out"].result()
    assert result.returncode == 1, result.stderr
    failures = [line for line in result.stdout.splitlines() if "scale:" in line]
    assert len(failures) == 1
    assert failures[0].startswith("  scale: 'weight' (rule 1 'linear weights'")
    assert "1 check(s) failed:" in result.stdout.splitlines()
    assert result.stderr.splitlines()[-1] == "initrules apply: 1 check(s) failed"
    assert not (workspace / "absurd.pt").exists()


def test_plot_without_matplotlib(runs: Runs, workspace: Path) -> None:
    result = runs["plot-no-matplotlib"].result()
    assert result.returncode == 1, result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith("ImportError: Report.plot needs matplotlib")
    assert "pip install 'initrules[plot]'" in last
    assert not (workspace / "no_matplotlib.png").exists()


def test_cli_without_matplotlib(runs: Runs, workspace: Path) -> None:
    result = runs["cli-no-matplotlib"].result()
    assert result.returncode == 2, result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith("initrules apply: error: --plot needs matplotlib")
    assert "initrules[plot]" in last
    assert not (workspace / "cli_no_matplotlib.png").exists()
