"""Benchmarks of initrules against plain torch, printed as ratios.

Timings on a shared machine are only meaningful side by side, so every
figure is a ratio of two times taken in the same process. Each round runs
both one after the other, and the printed value is the median over the
rounds. Run from the repository root:

    python benchmarks/bench.py                      # full sizes, medians of 5
    python benchmarks/bench.py --quick              # tiny models, 1 run (CI)
    python benchmarks/bench.py --models gpt2,bert   # a subset

Models (built from transformers config classes, nothing downloaded): GPT-2
medium, BERT base, ViT base, ResNet-50, and two 128-layer Llamas (hidden 64
and 256). Figures per model, where ``T_fill`` is one ``normal_`` pass over
every parameter on one thread, on memory already touched:

* ``apply / T_fill``: a seeded ``apply`` (statistics and checks included) on
  one thread and on torch's default thread count, where the seeded stream
  draws large tensors in parallel chunks.
* ``isinstance loop / T_fill``: the same init written by hand as a loop over
  ``model.modules()`` with ``isinstance`` tests, on one thread.
* ``mmengine initialize / T_fill``: ``mmengine.model.initialize`` with an
  equivalent ``init_cfg``, on one thread, when mmengine is installed.
* ``checks / T_fill``: the statistics plus the default checks over every
  tensor (``initrules.check`` minus its planning), and ``plan / T_fill``,
  both on the default thread count.
* ``build / (construct + apply)``: ``initrules.build`` against a normal
  construction (default init included) followed by ``apply``.
* ``cold / warm apply`` (on one thread) and ``peak RSS / (params +
  baseline)``: measured in a fresh subprocess per run, so that freshly
  allocated pages have never been touched and the peak RSS belongs to one
  ``build``.
* ``plan us/tensor``: resolving every tensor with a warm ``Matcher`` when the
  policy's rules follow filler rules that never match, for 10, 50 and 200
  rules in all.

Targets are printed next to some figures as PASS or MISS. They are
informative: a MISS never changes the exit status.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn

import initrules
from initrules.planner import walk_tensors

REPO_ROOT = Path(__file__).resolve().parents[1]
POLICIES = REPO_ROOT / "policies"

# The std of GPT-2's residual projections (c_proj), which policies/gpt2.yaml
# computes from the config as 0.02 / sqrt(2 * n_layer). The hand-written loops
# use the 12-layer value for every size: the value does not change their cost.
GPT2_RESIDUAL_STD = 0.02 / math.sqrt(2 * 12)

# transformers 5.25 names the ViT embedding parameters cls_token and
# position_embeddings; both live on ViTEmbeddings.
VIT_POLICY = """
version: 1
name: vit-base
on_unmatched: error
rules:
  - name: class token and position embeddings
    match: {module: ViTEmbeddings, param: "{cls_token,position_embeddings}"}
    init: {scheme: trunc_normal, mean: 0.0, std: 0.02}
  - name: dense and patch projection weights
    match: {module: [Linear, Conv2d], param: weight}
    init: {scheme: normal, mean: 0.0, std: 0.02}
  - name: layer norm scales
    match: {module: LayerNorm, param: weight}
    init: ones
  - name: biases
    match: {param: bias}
    init: zeros
"""

# ResNetModel has no classifier, so the Linear rule matches nothing there. It
# is kept for ResNetForImageClassification, whose head is a Linear.
RESNET_POLICY = """
version: 1
name: resnet-50
on_unmatched: error
rules:
  - name: convolutions
    match: {module: Conv2d, param: weight}
    init: {scheme: kaiming_normal, mode: fan_out, nonlinearity: relu}
  - name: batch norm scales
    match: {module: BatchNorm2d, param: weight}
    init: ones
  - name: classifier weights
    match: {module: Linear, param: weight}
    init: {scheme: normal, mean: 0.0, std: 0.01}
  - name: biases
    match: {param: bias}
    init: zeros
"""

RULE_COUNTS = (10, 50, 200)

# Each plan-cost measurement repeats passes over all tensors for at least
# this long, so that the timer's resolution does not matter.
PLAN_MEASURE_S = 0.1

SUBPROCESS_TIMEOUT_S = 900

# Figure labels, printed as the first column and checked by tests/test_bench.py.
PARAMETERS = "parameters"
FILL = "T_fill (s, 1 thread)"
APPLY_ONE = "apply / T_fill (1 thread)"
APPLY_ALL = "apply / T_fill (default threads)"
BY_HAND = "isinstance loop / T_fill"
MMENGINE = "mmengine initialize / T_fill"
CHECKS = "checks / T_fill"
PLAN = "plan / T_fill"
BUILD = "build / (construct + apply)"
COLD = "cold / warm apply (1 thread)"
RSS = "peak RSS / (params + baseline)"
PLAN_COST = "plan us/tensor, {count} rules"
PLAN_GROWTH = f"plan {RULE_COUNTS[-1]} / {RULE_COUNTS[0]} rules"
LABELS = (
    PARAMETERS,
    FILL,
    APPLY_ONE,
    APPLY_ALL,
    BY_HAND,
    MMENGINE,
    CHECKS,
    PLAN,
    BUILD,
    COLD,
    RSS,
    *(PLAN_COST.format(count=count) for count in RULE_COUNTS),
    PLAN_GROWTH,
)


# --- models ------------------------------------------------------------------


def _gpt2_config(quick: bool) -> Any:
    from transformers import GPT2Config

    if quick:
        return GPT2Config(
            n_layer=2,
            n_embd=128,
            n_head=4,
            vocab_size=1000,
            bos_token_id=999,
            eos_token_id=999,
        )
    # GPT-2 medium: 24 layers, width 1024, 355M parameters.
    return GPT2Config(n_layer=24, n_embd=1024, n_head=16)


def _bert_config(quick: bool) -> Any:
    from transformers import BertConfig

    if quick:
        return BertConfig(
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=512,
            vocab_size=1000,
        )
    return BertConfig()


def _vit_config(quick: bool) -> Any:
    from transformers import ViTConfig

    if quick:
        return ViTConfig(
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=512,
            image_size=64,
        )
    return ViTConfig()


def _resnet_config(quick: bool) -> Any:
    from transformers import ResNetConfig

    if quick:
        return ResNetConfig(
            embedding_size=16, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1]
        )
    # The defaults are ResNet-50: bottleneck blocks, depths 3, 4, 6, 3.
    return ResNetConfig()


def _llama_config(hidden: int, intermediate: int, heads: int, quick: bool) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        num_hidden_layers=4 if quick else 128,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=1000,
        tie_word_embeddings=False,
    )


# --- hand-written inits, the baselines ------------------------------------------


def _init_text_by_hand(model: nn.Module, residual_std: float | None = None) -> None:
    """Initialize GPT-2, BERT or Llama as their policies do, with isinstance tests.

    ``residual_std`` is the std of GPT-2's ``c_proj`` weights. A tied weight
    is drawn once, as the policy draws it.
    """
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.pytorch_utils import Conv1D

    drawn: set[int] = set()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, (Conv1D, nn.Linear, nn.Embedding)):
                if id(module.weight) not in drawn:
                    residual = residual_std is not None and name.endswith(".c_proj")
                    std = residual_std if residual else 0.02
                    module.weight.normal_(0.0, std)
                    drawn.add(id(module.weight))
                padding_idx = getattr(module, "padding_idx", None)
                if padding_idx is not None:
                    module.weight[padding_idx].zero_()
            elif isinstance(module, (nn.LayerNorm, LlamaRMSNorm)):
                module.weight.fill_(1.0)
            bias = getattr(module, "bias", None)
            if isinstance(bias, nn.Parameter):
                bias.zero_()


def _init_vit_by_hand(model: nn.Module) -> None:
    """Initialize ViT as ``VIT_POLICY`` does, with isinstance tests."""
    from transformers.models.vit.modeling_vit import ViTEmbeddings

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                module.weight.normal_(0.0, 0.02)
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, ViTEmbeddings):
                nn.init.trunc_normal_(module.cls_token, std=0.02)
                nn.init.trunc_normal_(module.position_embeddings, std=0.02)
            bias = getattr(module, "bias", None)
            if isinstance(bias, nn.Parameter):
                bias.zero_()


def _init_resnet_by_hand(model: nn.Module) -> None:
    """Initialize ResNet as ``RESNET_POLICY`` does, with isinstance tests."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(
                    module.weight, mode="fan_out", nonlinearity="relu"
                )
            elif isinstance(module, nn.BatchNorm2d):
                module.weight.fill_(1.0)
            elif isinstance(module, nn.Linear):
                module.weight.normal_(0.0, 0.01)
            bias = getattr(module, "bias", None)
            if isinstance(bias, nn.Parameter):
                bias.zero_()


# NOTE: the mmengine inits below follow mmengine's documented init_cfg keys
# but were not run where the figures in benchmarks/README.md were taken,
# because mmengine was not installed there.


def _init_text_with_mmengine(
    model: nn.Module, residual_std: float | None = None
) -> None:
    """Initialize GPT-2, BERT or Llama with ``mmengine.model.initialize``.

    ``layer`` matches class names only, so GPT-2's ``c_proj`` std and the
    embeddings' padding rows are set afterwards, module by module.
    """
    from mmengine.model import initialize

    initialize(
        model,
        [
            {
                "type": "Normal",
                "layer": ["Conv1D", "Linear", "Embedding"],
                "std": 0.02,
                "bias": 0,
            },
            {"type": "Constant", "layer": ["LayerNorm", "LlamaRMSNorm"], "val": 1},
        ],
    )
    for name, module in model.named_modules():
        if residual_std is not None and name.endswith(".c_proj"):
            config = {"type": "Normal", "layer": "Conv1D", "std": residual_std}
            initialize(module, config)
        padding_idx = getattr(module, "padding_idx", None)
        if isinstance(module, nn.Embedding) and padding_idx is not None:
            with torch.no_grad():
                module.weight[padding_idx].zero_()


def _init_vit_with_mmengine(model: nn.Module) -> None:
    """Initialize ViT with ``mmengine.model.initialize``.

    mmengine's initializers write ``weight`` and ``bias`` only, so the class
    token and position embeddings are drawn afterwards.
    """
    from mmengine.model import initialize
    from transformers.models.vit.modeling_vit import ViTEmbeddings

    initialize(
        model,
        [
            {"type": "Normal", "layer": ["Linear", "Conv2d"], "std": 0.02, "bias": 0},
            {"type": "Constant", "layer": "LayerNorm", "val": 1, "bias": 0},
        ],
    )
    for module in model.modules():
        if isinstance(module, ViTEmbeddings):
            nn.init.trunc_normal_(module.cls_token, std=0.02)
            nn.init.trunc_normal_(module.position_embeddings, std=0.02)


def _init_resnet_with_mmengine(model: nn.Module) -> None:
    """Initialize ResNet with ``mmengine.model.initialize``."""
    from mmengine.model import initialize

    initialize(
        model,
        [
            {
                "type": "Kaiming",
                "layer": "Conv2d",
                "mode": "fan_out",
                "nonlinearity": "relu",
                "distribution": "normal",
            },
            {"type": "Constant", "layer": "BatchNorm2d", "val": 1, "bias": 0},
            {"type": "Normal", "layer": "Linear", "std": 0.01, "bias": 0},
        ],
    )


# --- cases -------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """A model to measure, its policy, and the same init written by hand.

    Attributes:
        key: The name ``--models`` selects it by.
        title: The full-size model's name. ``--quick`` builds a tiny one.
        model_class: The transformers class to construct.
        config: Returns the config, given whether the run is ``--quick``.
        policy: Returns the policy.
        init_by_hand: The isinstance loop equivalent to the policy.
        init_with_mmengine: The ``mmengine.model.initialize`` equivalent.
    """

    key: str
    title: str
    model_class: str
    config: Callable[[bool], Any]
    policy: Callable[[], initrules.Policy]
    init_by_hand: Callable[[nn.Module], None]
    init_with_mmengine: Callable[[nn.Module], None]

    def factory(self, quick: bool) -> Callable[[], nn.Module]:
        """Return a function that constructs the model, its class imported."""
        import transformers

        model_class = getattr(transformers, self.model_class)
        return functools.partial(model_class, self.config(quick))


CASES = {
    case.key: case
    for case in (
        Case(
            "gpt2",
            "GPT-2 medium",
            "GPT2LMHeadModel",
            _gpt2_config,
            lambda: initrules.load_policy(POLICIES / "gpt2.yaml"),
            functools.partial(_init_text_by_hand, residual_std=GPT2_RESIDUAL_STD),
            functools.partial(_init_text_with_mmengine, residual_std=GPT2_RESIDUAL_STD),
        ),
        Case(
            "bert",
            "BERT base",
            "BertModel",
            _bert_config,
            lambda: initrules.load_policy(POLICIES / "bert.yaml"),
            _init_text_by_hand,
            _init_text_with_mmengine,
        ),
        Case(
            "vit",
            "ViT base",
            "ViTModel",
            _vit_config,
            lambda: initrules.load_policy(text=VIT_POLICY),
            _init_vit_by_hand,
            _init_vit_with_mmengine,
        ),
        Case(
            "resnet",
            "ResNet-50",
            "ResNetModel",
            _resnet_config,
            lambda: initrules.load_policy(text=RESNET_POLICY),
            _init_resnet_by_hand,
            _init_resnet_with_mmengine,
        ),
        Case(
            "llama64",
            "Llama 128 layers x 64",
            "LlamaForCausalLM",
            functools.partial(_llama_config, 64, 172, 2),
            lambda: initrules.load_policy(POLICIES / "llama.yaml"),
            _init_text_by_hand,
            _init_text_with_mmengine,
        ),
        Case(
            "llama256",
            "Llama 128 layers x 256",
            "LlamaForCausalLM",
            functools.partial(_llama_config, 256, 688, 4),
            lambda: initrules.load_policy(POLICIES / "llama.yaml"),
            _init_text_by_hand,
            _init_text_with_mmengine,
        ),
    )
}


# --- targets -----------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """An upper bound on one figure.

    Attributes:
        label: The figure.
        limit: The largest value that passes.
        model: The model key it applies to, or ``None`` for every model.
        threads: If set, the target is judged only when torch runs on this
            many threads by default.
    """

    label: str
    limit: float
    model: str | None = None
    threads: int | None = None


TARGETS = (
    Target(APPLY_ONE, 1.10, "gpt2"),
    Target(APPLY_ONE, 1.25, "llama64"),
    Target(APPLY_ALL, 0.65, "gpt2", threads=2),
    Target(BUILD, 0.45, "gpt2"),
    Target(BUILD, 0.45, "bert"),
    Target(CHECKS, 0.5, "gpt2"),
    Target(COLD, 1.3),
    Target(RSS, 1.05),
    Target(PLAN_COST.format(count=RULE_COUNTS[-1]), 2.0),
    Target(PLAN_GROWTH, 1.5),
)


def _target_for(label: str, key: str) -> Target | None:
    for target in TARGETS:
        if target.label == label and target.model in (None, key):
            return target
    return None


# --- timing helpers ----------------------------------------------------------


def _median_seconds(action: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@contextlib.contextmanager
def _threads(count: int) -> Iterator[None]:
    """Run the block with torch on ``count`` threads, then restore the count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _fill(model: nn.Module) -> None:
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_()


def _parameter_bytes(model: nn.Module) -> int:
    # model.parameters() yields a tied parameter once.
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _peak_rss_kib() -> float:
    """Return this process's peak resident set size, in KiB.

    On Linux this reads VmHWM from /proc/self/status rather than
    ``ru_maxrss``, because a process started by exec inherits the
    ``ru_maxrss`` of its parent. Measured on Linux 6.18: a child of a parent
    holding 1.5 GB reported 1.5 GB before allocating anything. VmHWM is the
    peak of this process's own memory.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1])
    except OSError:
        pass
    import resource

    # NOTE: without /proc, the peak may be the parent's, as explained above.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / 1024 if sys.platform == "darwin" else float(peak)


# --- figures -----------------------------------------------------------------


def mmengine_skip_reason() -> str | None:
    """Return why the mmengine figure is skipped, or ``None`` if it can run."""
    try:
        import mmengine.model  # noqa: F401
    except ImportError as error:
        return f"mmengine is not importable ({error})"
    return None


def _on_threads(count: int, action: Callable[[], object]) -> Callable[[], None]:
    def run() -> None:
        with _threads(count):
            action()

    return run


def _rounds(
    actions: dict[str, Callable[[], object]], repeats: int
) -> dict[str, list[float]]:
    """Run every action once per round, in order, and return each one's times.

    One untimed round comes first, so no timing pays first-call costs or
    first-touch page faults. Pairing each action with the ``T_fill`` of its
    own round keeps a ratio fair when the machine's load drifts.
    """
    for action in actions.values():
        action()
    times: dict[str, list[float]] = {name: [] for name in actions}
    for _ in range(repeats):
        for name, action in actions.items():
            start = time.perf_counter()
            action()
            times[name].append(time.perf_counter() - start)
    return times


def measure_against_fill(
    case: Case, model: nn.Module, policy: initrules.Policy, repeats: int, threads: int
) -> tuple[float, dict[str, float]]:
    """Return T_fill and the medians, over rounds, of each figure over T_fill.

    The figures are apply on 1 and on ``threads`` threads, the isinstance
    loop, mmengine (when importable), the checks and the plan. The
    hand-written inits run before apply in each round, so the checks judge
    the values the policy wrote.
    """
    actions: dict[str, Callable[[], object]] = {
        FILL: _on_threads(1, lambda: _fill(model)),
        BY_HAND: _on_threads(1, lambda: case.init_by_hand(model)),
    }
    if mmengine_skip_reason() is None:
        actions[MMENGINE] = _on_threads(1, lambda: case.init_with_mmengine(model))
    actions[APPLY_ONE] = _on_threads(1, lambda: initrules.apply(model, policy, seed=0))
    actions[APPLY_ALL] = _on_threads(
        threads, lambda: initrules.apply(model, policy, seed=0)
    )
    actions[PLAN] = _on_threads(threads, lambda: initrules.make_plan(model, policy))
    actions[CHECKS] = _on_threads(threads, lambda: initrules.check(model, policy))
    times = _rounds(actions, repeats)
    fills = times.pop(FILL)
    # check() plans before it measures, so the checks alone cost the difference.
    times[CHECKS] = [
        check - plan for check, plan in zip(times[CHECKS], times[PLAN], strict=True)
    ]
    ratios = {
        name: statistics.median(
            value / fill for value, fill in zip(values, fills, strict=True)
        )
        for name, values in times.items()
    }
    return statistics.median(fills), ratios


def measure_build(case: Case, quick: bool, repeats: int) -> float:
    """Return the median over rounds of ``build`` / (construct + ``apply``).

    The two alternate, so both see the same state of the allocator and of
    the machine's load.
    """
    factory = case.factory(quick)
    policy = case.policy()
    ratios: list[float] = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        model, _ = initrules.build(factory, policy, seed=0)
        built = time.perf_counter() - start
        del model
        gc.collect()
        start = time.perf_counter()
        model = factory()
        initrules.apply(model, policy, seed=0)
        ratios.append(built / (time.perf_counter() - start))
        del model
    return statistics.median(ratios)


def _reallocate(model: nn.Module) -> None:
    """Give every parameter new, never-touched storage, keeping ties.

    Every new tensor is allocated before any old one is released, so the
    allocator cannot hand back pages the old ones touched.
    """
    parameters = list(model.parameters())
    fresh = [torch.empty_like(parameter) for parameter in parameters]
    with torch.no_grad():
        for parameter, storage in zip(parameters, fresh, strict=True):
            parameter.data = storage


def measure_in_fresh_process(key: str, quick: bool) -> dict[str, float]:
    """Measure one ``build`` in this fresh process: peak RSS, cold and warm apply.

    Run through ``--measure-build``. The baseline is the peak RSS after the
    imports, the policy and the config, before the model exists, which is
    the RSS at that point give or take the imports' transient allocations.
    """
    case = CASES[key]
    factory = case.factory(quick)
    policy = case.policy()
    gc.collect()
    baseline_kib = _peak_rss_kib()
    model, _ = initrules.build(factory, policy, seed=0)
    peak_kib = _peak_rss_kib()
    parameter_bytes = _parameter_bytes(model)
    # One thread, so that the ratio shows the page faults rather than how
    # the threads were scheduled on a shared machine.
    torch.set_num_threads(1)
    # NOTE: freed heap chunks (from the checks inside build) can be reused
    # by _reallocate, so a small share of the "cold" pages may be warm.
    _reallocate(model)
    start = time.perf_counter()
    initrules.apply(model, policy, seed=0)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    initrules.apply(model, policy, seed=0)
    warm = time.perf_counter() - start
    return {
        "baseline_kib": baseline_kib,
        "peak_kib": peak_kib,
        "parameter_bytes": float(parameter_bytes),
        "cold_s": cold,
        "warm_s": warm,
    }


def measure_subprocesses(case: Case, quick: bool, repeats: int) -> tuple[float, float]:
    """Return the medians of cold/warm apply and of peak RSS over fresh processes."""
    command = [sys.executable, str(Path(__file__).resolve())]
    command += ["--measure-build", case.key] + (["--quick"] if quick else [])
    cold_ratios: list[float] = []
    rss_ratios: list[float] = []
    for _ in range(repeats):
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=SUBPROCESS_TIMEOUT_S,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command)} exited with {result.returncode}:\n"
                f"{result.stderr[-4000:]}"
            )
        found = json.loads(result.stdout.strip().splitlines()[-1])
        cold_ratios.append(found["cold_s"] / found["warm_s"])
        expected_kib = found["baseline_kib"] + found["parameter_bytes"] / 1024
        rss_ratios.append(found["peak_kib"] / expected_kib)
    return statistics.median(cold_ratios), statistics.median(rss_ratios)


def _with_fillers(policy: initrules.Policy, count: int) -> initrules.Policy:
    """Return ``policy`` with filler rules before its own, ``count`` rules in all.

    The fillers name a ``decoder.blocks`` path that none of the models has,
    so they never match.
    """
    fillers = max(count - len(policy.rules), 0)
    if fillers == 0:
        return policy
    lines = ["rules:"]
    for index in range(fillers):
        lines.append(f"  - match: {{name: 'decoder.blocks.{index}.*.weight'}}")
        lines.append("    init: zeros")
    filler_rules = initrules.load_policy(text="\n".join(lines)).rules
    return policy.model_copy(update={"rules": [*filler_rules, *policy.rules]})


def _match_passes(
    matcher: initrules.Matcher, infos: list[initrules.TensorInfo], passes: int
) -> None:
    for _ in range(passes):
        for info in infos:
            matcher.match(info)


def measure_plan_cost(
    model: nn.Module, policy: initrules.Policy, repeats: int
) -> dict[int, float]:
    """Return the microseconds per tensor of a warm ``Matcher``, by rule count.

    The walk is left out: the tensors' ``TensorInfo`` list is built once.
    """
    parameters, buffers = walk_tensors(model)
    infos = [entry.info for entry in parameters + buffers]
    costs: dict[int, float] = {}
    for count in RULE_COUNTS:
        padded = _with_fillers(policy, count)
        matcher = initrules.Matcher(padded)
        fillers = len(padded.rules) - len(policy.rules)
        for info in infos:  # warm the matcher's caches, and check the fillers
            result = matcher.match(info)
            if result is not None and result.rule_index < fillers:
                raise RuntimeError(f"a filler rule matched {info.name!r}")
        start = time.perf_counter()
        _match_passes(matcher, infos, 1)
        one_pass = max(time.perf_counter() - start, 1e-9)
        passes = max(1, math.ceil(PLAN_MEASURE_S / one_pass))
        action = functools.partial(_match_passes, matcher, infos, passes)
        seconds = _median_seconds(action, repeats)
        costs[count] = seconds / (passes * len(infos)) * 1e6
    return costs


# --- report ------------------------------------------------------------------


@dataclass
class Table:
    """The figures of one model, printed with their targets."""

    key: str
    judge: bool
    threads: int
    rows: list[tuple[str, str, str, str]]
    misses: list[str]
    passes: int = 0

    def add(self, label: str, value: float | None, text: str | None = None) -> None:
        """Add a figure. ``text``, if given, replaces the formatted value."""
        value_text = text if text is not None else f"{value:.3f}"
        target = _target_for(label, self.key)
        limit = verdict = ""
        if target is not None and value is not None:
            limit = f"<= {target.limit:g}"
            if not self.judge:
                verdict = "-"
            elif target.threads is not None and target.threads != self.threads:
                verdict = f"n/a, for {target.threads} threads"
            elif value <= target.limit:
                verdict = "PASS"
                self.passes += 1
            else:
                verdict = "MISS"
                self.misses.append(f"{self.key}: {label} = {value:.3f} ({limit})")
        self.rows.append((label, value_text, limit, verdict))

    def print(self, title: str) -> None:
        """Print the table under ``title``."""
        print(f"\n{title}")
        header = ("figure", "value", "target", "")
        widths = [
            max(len(row[column]) for row in [header, *self.rows]) for column in range(3)
        ]
        for row in [header, *self.rows]:
            cells = [
                cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True)
            ]
            print("  " + "  ".join([*cells, row[3]]).rstrip())


def measure_case(
    case: Case, quick: bool, repeats: int, with_subprocess: bool, table: Table
) -> str:
    """Measure every figure of one model into ``table`` and return its title."""
    policy = case.policy()
    model = case.factory(quick)()
    report = initrules.apply(model, policy, seed=0)
    if report.unmatched or not report.ok:
        raise RuntimeError(
            f"{case.key}: the policy left {report.unmatched} unmatched and failed "
            f"{len(report.failures)} check(s)"
        )
    parameters = sum(p.numel() for p in model.parameters())
    title = f"{case.title if not quick else case.key + ' (tiny)'}: "
    title += f"{case.model_class}, {parameters:,} parameters"

    fill, ratios = measure_against_fill(case, model, policy, repeats, table.threads)
    table.add(PARAMETERS, None, f"{parameters:,}")
    table.add(FILL, fill, f"{fill:.3f} ({fill / parameters * 1e9:.1f} ns/element)")
    for label in (APPLY_ONE, APPLY_ALL, BY_HAND, MMENGINE, CHECKS, PLAN):
        if label in ratios:
            table.add(label, ratios[label])
        else:
            table.add(label, None, "skipped")
    costs = measure_plan_cost(model, policy, repeats)
    del model
    gc.collect()

    table.add(BUILD, measure_build(case, quick, repeats))
    if with_subprocess:
        cold, rss = measure_subprocesses(case, quick, repeats)
        table.add(COLD, cold)
        table.add(RSS, rss)
    else:
        table.add(COLD, None, "skipped (--quick)")
        table.add(RSS, None, "skipped (--quick)")
    for count, cost in costs.items():
        table.add(PLAN_COST.format(count=count), cost)
    table.add(PLAN_GROWTH, costs[RULE_COUNTS[-1]] / costs[RULE_COUNTS[0]])
    return title


def _transparent_huge_pages() -> str:
    try:
        return Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        return "unknown"


def _load_average() -> str:
    try:
        return ", ".join(f"{load:.2f}" for load in os.getloadavg())
    except OSError:
        return "unknown"


def print_environment(repeats: int) -> None:
    """Print the versions and the machine the figures depend on."""
    import transformers

    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs, "
        f"capability {torch.backends.cpu.get_cpu_capability()}"
    )
    print(
        f"transparent huge pages: {_transparent_huge_pages()}; "
        f"load average {_load_average()}; medians of {repeats}"
    )
    print(
        "cold / warm depends on the host (page-fault cost, huge pages), and "
        "T_fill on the load of the machine."
    )


def _parse_models(text: str) -> list[str]:
    keys = [key.strip() for key in text.split(",") if key.strip()]
    unknown = [key for key in keys if key not in CASES]
    if unknown or not keys:
        raise argparse.ArgumentTypeError(
            f"unknown model(s) {', '.join(unknown) or text!r}; "
            f"choose from {', '.join(CASES)}"
        )
    return keys


# Generation time per rank with 2 ranks, as a share of the 1-rank time.
SHARDED_TARGET = 0.6
SHARDED_TIMEOUT_S = 1200


def _run_ranks(
    model: str, world: int, quick: bool, out: Path
) -> list[dict[str, float]]:
    """Run benchmarks/sharded_rank.py on ``world`` gloo ranks; return their figures."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = Path(__file__).parent / "sharded_rank.py"
    ranks = [
        subprocess.Popen(
            [
                sys.executable,
                str(script),
                str(rank),
                str(world),
                str(port),
                str(out / f"rank{rank}.json"),
                model,
                *(["--quick"] if quick else []),
            ],
            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        )
        for rank in range(world)
    ]
    try:
        for process in ranks:
            process.wait(timeout=SHARDED_TIMEOUT_S)
    finally:
        for process in ranks:
            if process.poll() is None:
                process.kill()
                process.wait()
    failed = [rank for rank, process in enumerate(ranks) if process.returncode != 0]
    if failed:
        codes = [ranks[rank].returncode for rank in failed]
        raise RuntimeError(
            f"sharded benchmark of {model} on {world} rank(s): ranks {failed} failed "
            f"with exit codes {codes}"
        )
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(world)]


# The models of the distributed mode, with what the table calls them.
SHARDED_MODELS = {
    "gpt2": "GPT-2 small, gpt2.yaml",
    "llama-wide": "Llama of width 2048 and 4 layers, llama.yaml",
}


def run_distributed(quick: bool) -> int:
    """Print the generation time and peak memory per rank on 1 and 2 ranks."""
    print_environment(1 if quick else 5)
    for model, title in SHARDED_MODELS.items():
        results = {}
        with tempfile.TemporaryDirectory() as scratch:
            for world in (1, 2):
                out = Path(scratch) / str(world)
                out.mkdir()
                results[world] = _run_ranks(model, world, quick, out)
        parameters = int(results[1][0]["parameters"])
        print(f"\nsharded fill (FSDP2, gloo), {title}: {parameters:,} parameters")
        header = ("ranks", "seconds per rank (slowest)", "peak RSS per rank")
        print(f"{header[0]:>5}  {header[1]:>26}  {header[2]:>18}")
        for world, figures in results.items():
            slowest = max(figure["seconds"] for figure in figures)
            peak = max(figure["peak_rss_kib"] for figure in figures) / 1024
            print(f"{world:>5}  {slowest:>26.3f}  {peak:>15.0f} MiB")
        ratio = max(f["seconds"] for f in results[2]) / results[1][0]["seconds"]
        verdict = ""
        if not quick:
            verdict = "  PASS" if ratio <= SHARDED_TARGET else "  MISS"
        print(f"2 ranks / 1 rank: {ratio:.2f} (target <= {SHARDED_TARGET}){verdict}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks and print one table per model."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny models, one repetition, RSS and cold/warm for the first model "
        "only (for CI)",
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="repetitions per timing (default: 5)"
    )
    parser.add_argument(
        "--models",
        type=_parse_models,
        default=list(CASES),
        help=f"comma-separated models to run (default: all of {','.join(CASES)})",
    )
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="time the sharded fill of GPT-2 small (124M parameters) on 1 and 2 "
        "gloo ranks (one thread each) instead of the single-process tables",
    )
    # Internal: the subprocess that measures one build in a fresh process.
    parser.add_argument("--measure-build", choices=list(CASES), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure_build is not None:
        print(json.dumps(measure_in_fresh_process(args.measure_build, args.quick)))
        return 0
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")

    if args.distributed:
        return run_distributed(args.quick)
    repeats = 1 if args.quick else args.repeats
    threads = torch.get_num_threads()
    print_environment(repeats)
    skip = mmengine_skip_reason()
    if skip is not None:
        print(f"skipped: {MMENGINE}, because {skip}")
    if args.quick:
        print(
            "--quick: tiny models, so the targets are not judged; cold / warm and "
            "peak RSS are measured for the first model only."
        )
    misses: list[str] = []
    passes = 0
    for index, key in enumerate(args.models):
        table = Table(key, not args.quick, threads, [], misses)
        with_subprocess = index == 0 or not args.quick
        title = measure_case(CASES[key], args.quick, repeats, with_subprocess, table)
        table.print(title)
        passes += table.passes
    print(f"\nload average at the end: {_load_average()}")
    if not args.quick:
        print(f"targets: {passes} passed, {len(misses)} missed")
        for miss in misses:
            print(f"  MISS {miss}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
