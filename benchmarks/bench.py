"""Benchmarks of initrules against plain torch, printed as ratios.

Timings on a shared machine are only meaningful side by side, so every
figure is a ratio of two medians measured in the same process, one after
the other. Run from the repository root:

    python benchmarks/bench.py            # full sizes, 5 repetitions
    python benchmarks/bench.py --quick    # small sizes, 1 repetition (CI)

Measured here:

* ``checks / T_fill``: the report's statistics plus the default checks over
  every tensor (``initrules.check`` minus its planning), against one
  ``normal_`` pass over all parameters (``T_fill``).
* ``apply / T_fill``: a seeded ``apply`` with its statistics and checks.
* ``plan / T_fill``: walking the model and resolving every tensor's rule.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn

import initrules

REPO_ROOT = Path(__file__).resolve().parents[1]
POLICIES = REPO_ROOT / "policies"


@dataclass(frozen=True)
class Case:
    """A model to measure: its name, how to build it and its policy."""

    name: str
    build: Callable[[], nn.Module]
    policy: Path


def _gpt2(quick: bool) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    if quick:
        config = GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=1000)
    else:
        # GPT-2 medium: 24 layers, width 1024, 355M parameters.
        config = GPT2Config(n_layer=24, n_embd=1024, n_head=16)
    return GPT2LMHeadModel(config)


def _median_seconds(action: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _fill(model: nn.Module) -> None:
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_()


def measure_checks(case: Case, repeats: int) -> dict[str, float]:
    """Return the check, plan and apply times of one model as ratios of T_fill."""
    model = case.build()
    policy = initrules.load_policy(case.policy)
    initrules.apply(model, policy, seed=0)
    _fill(model)  # touch every page once, so no timing pays first-touch faults
    fill = _median_seconds(lambda: _fill(model), repeats)
    initrules.apply(model, policy, seed=0)
    plan = _median_seconds(lambda: initrules.make_plan(model, policy), repeats)
    check = _median_seconds(lambda: initrules.check(model, policy), repeats)
    apply = _median_seconds(lambda: initrules.apply(model, policy, seed=0), repeats)
    parameters = sum(p.numel() for p in model.parameters())
    return {
        "parameters": float(parameters),
        "T_fill (s)": fill,
        "checks / T_fill": (check - plan) / fill,
        "plan / T_fill": plan / fill,
        "apply / T_fill": apply / fill,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks and print one table per model."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="small models, one repetition (for CI)"
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="repetitions per timing (default: 5)"
    )
    args = parser.parse_args(argv)
    repeats = 1 if args.quick else args.repeats
    cases = [
        Case(
            "GPT-2" if args.quick else "GPT-2 medium",
            lambda: _gpt2(args.quick),
            POLICIES / "gpt2.yaml",
        )
    ]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs, medians of {repeats}"
    )
    for case in cases:
        results = measure_checks(case, repeats)
        print(f"\n{case.name}")
        for key, value in results.items():
            text = f"{value:,.0f}" if key == "parameters" else f"{value:.3f}"
            print(f"  {key:<18} {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
