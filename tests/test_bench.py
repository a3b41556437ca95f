"""Run benchmarks/bench.py in its reduced mode and check that it prints every figure.

Only the output's shape is checked: the timings of a shared test machine are
too noisy to assert on.
"""

import importlib.util
import os
import subprocess
import sys
from functools import cache
from pathlib import Path
from types import ModuleType

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCH = REPO_ROOT / "benchmarks" / "bench.py"
TIMEOUT_S = 300


@cache
def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("benchmarks_bench", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the file runs.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@cache
def run_quick_gpt2() -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--models", "gpt2"],
        cwd=REPO_ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


def test_quick_run_exits_zero() -> None:
    result = run_quick_gpt2()
    assert result.returncode == 0, result.stderr[-4000:]


def test_quick_run_prints_every_label() -> None:
    output = run_quick_gpt2().stdout
    printed = {line.strip().split("  ")[0] for line in output.splitlines()}
    for label in load_bench().LABELS:
        assert label in printed, f"{label!r} missing from the output:\n{output}"


def test_quick_run_measures_subprocess_figures() -> None:
    # The first model of a --quick run gets the fresh-process figures, so
    # neither may be printed as skipped.
    bench = load_bench()
    lines = run_quick_gpt2().stdout.splitlines()
    for label in (bench.COLD, bench.RSS):
        row = next(line for line in lines if line.strip().startswith(label))
        assert "skipped" not in row, row


def test_quick_run_prints_environment() -> None:
    output = run_quick_gpt2().stdout
    assert "torch " in output
    assert "capability " in output
    assert "load average" in output


def test_unknown_model_is_rejected() -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH), "--models", "gpt3"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 2
    assert "gpt3" in result.stderr


def test_distributed_quick_run_prints_both_models() -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH), "--distributed", "--quick"],
        cwd=REPO_ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    lines = result.stdout.splitlines()
    titles = [line for line in lines if line.startswith("sharded fill")]
    assert len(titles) == len(load_bench().SHARDED_MODELS)
    ratios = [line for line in lines if line.startswith("2 ranks / 1 rank: ")]
    assert len(ratios) == len(titles)
    # --quick judges no target: the models are tiny.
    assert not any("PASS" in line or "MISS" in line for line in ratios)
