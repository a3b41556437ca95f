"""Tests of the seeded stream format in initrules.stream.

Run as a script, ``python tests/test_stream.py OUT`` saves the golden tensors
and the CPU capability to OUT with torch.save. The capability test runs it in
subprocesses, because torch reads ATEN_CPU_CAPABILITY only when imported.
"""

import functools
import hashlib
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import initrules
from initrules import derive_seed, get_scheme, scheme_names
from initrules.stream import CHUNK_ELEMENTS, Draw

GOLDEN_SEED = 1234

GOLDEN_POLICY = initrules.load_policy(
    text="""
rules:
  - {match: {name: small.weight}, init: {scheme: uniform, a: -0.1, b: 0.1}}
  - {match: {name: small.bias}, init: zeros}
  - {match: {name: table.weight}, init: {scheme: normal, std: 0.02}}
  - {match: {name: rotation.weight}, init: {scheme: orthogonal}}
  - match: {name: truncated.weight}
    init: {scheme: trunc_normal, std: 0.02, a: -0.04, b: 0.04}
  - {match: {name: fan.weight}, init: {scheme: kaiming_uniform, nonlinearity: relu}}
"""
)

# sha256 of each golden tensor's bytes (little-endian), first 32 hex digits,
# pinned with torch 2.13.0+cpu on an x86-64 CPU. The vectorized (AVX2) and
# scalar (DEFAULT) kernels of uniform_ and normal_ round differently, so the
# random tensors have one digest per ATen CPU capability.
# NOTE: measured on x86-64 only. Another architecture's scalar kernels may
# round differently from these DEFAULT digests.
GOLDEN_DIGESTS: dict[str, dict[str, str]] = {
    "AVX2": {
        "small.weight": "4236fbe36a09359a82ad06afc3a89a6b",
        "small.bias": "66687aadf862bd776c8fc18b8e9f8e20",
        "table.weight": "1889024518529ee14cd37db9a8bedc36",
        "rotation.weight": "477ee5da1fd6a49c535c3551224db6c4",
        "truncated.weight": "1499ec4cde67bc0122ec9c164260009c",
        "fan.weight": "ce88f51b2ec58be08afc91dba504e34b",
        "table.weight:bfloat16": "bdf6d1e6138598516b3c8244ef1e7056",
    },
    "DEFAULT": {
        "small.weight": "5d88322f80c825517d8ff3adf134af0a",
        "small.bias": "66687aadf862bd776c8fc18b8e9f8e20",
        "table.weight": "cf5bb5d41304ec92247c0f8001b29c65",
        "rotation.weight": "b47d9c705473a57e19f169872e1f175d",
        "truncated.weight": "045bf0366c1e2b8b45b5c60941adb151",
        "fan.weight": "9d12a06e41be36e58aa142c4e04c59e8",
        "table.weight:bfloat16": "4fb211113bfecf254c11ff9175f9809b",
    },
}
# torch 2.13.0's AVX512 kernels give the AVX2 values (measured on an AMD EPYC
# guest).
GOLDEN_DIGESTS["AVX512"] = GOLDEN_DIGESTS["AVX2"]

# Number of elements of each tensor that differ between a native capability
# and DEFAULT, measured with the same torch build. Tensors not listed, such as
# the zeros, are equal.
CAPABILITY_DIFFERENCES = {
    "AVX2": {
        "small.weight": 61,
        "table.weight": 413556,
        "rotation.weight": 1789,
        "truncated.weight": 392013,
        "fan.weight": 547391,
        "table.weight:bfloat16": 127,
    },
}
CAPABILITY_DIFFERENCES["AVX512"] = CAPABILITY_DIFFERENCES["AVX2"]

# Bound on the max abs difference between one tensor's values under two
# capabilities, in units of the dtype's eps times the tensor's max |value|.
# test_capability_digests measured at most 9.8 (truncated.weight, AVX2 against
# DEFAULT).
MAX_CAPABILITY_EPS = 16


class Golden(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # 128 elements, drawn in one piece.
        self.small = nn.Linear(16, 8)
        # 1,134,100 elements, so chunk 1 contains only the last 85,524.
        self.table = nn.Embedding(1031, 1100)
        self.rotation = nn.Linear(32, 64, bias=False)
        # 1,054,720 and 1,061,930 elements.
        self.truncated = nn.Linear(1030, 1024, bias=False)
        self.fan = nn.Linear(1031, 1030, bias=False)


@functools.cache
def golden_tensors() -> dict[str, torch.Tensor]:
    """Apply GOLDEN_POLICY with GOLDEN_SEED; return the tensors to digest.

    Cached because the tests only read the tensors.
    ``table.weight:bfloat16`` is ``table.weight`` drawn into a bfloat16
    tensor of the same name, so it shares the float32 tensor's stream.
    """
    golden = Golden()
    report = initrules.apply(golden, GOLDEN_POLICY, seed=GOLDEN_SEED)
    assert report.ok
    narrow = nn.ModuleDict({"table": nn.Embedding(1031, 1100, dtype=torch.bfloat16)})
    initrules.apply(narrow, GOLDEN_POLICY, seed=GOLDEN_SEED)
    tensors = {name: param.detach() for name, param in golden.named_parameters()}
    tensors["table.weight:bfloat16"] = narrow["table"].weight.detach()
    return tensors


def digest(tensor: torch.Tensor) -> str:
    data = tensor.contiguous().view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:32]


def diff_in_eps(first: torch.Tensor, second: torch.Tensor) -> float:
    """Return the max abs difference in units of eps times the largest magnitude."""
    scale = float(first.double().abs().max()) * torch.finfo(first.dtype).eps
    return float((first.double() - second.double()).abs().max()) / scale


def test_golden_digests() -> None:
    """Pin the seeded values of a few tensors.

    A changed digest means the stream format changed (or torch's kernels
    did), so every seeded result changes, and the README must say so.
    """
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in GOLDEN_DIGESTS:
        pytest.skip(f"no golden digests pinned for CPU capability {capability}")
    pinned = GOLDEN_DIGESTS[capability]
    tensors = golden_tensors()
    assert sorted(tensors) == sorted(pinned)
    for name, tensor in tensors.items():
        assert digest(tensor) == pinned[name], name


def test_bf16_rounds_float32() -> None:
    tensors = golden_tensors()
    rounded = tensors["table.weight"].to(torch.bfloat16)
    assert torch.equal(tensors["table.weight:bfloat16"], rounded)


def run_golden(tmp_path: Path) -> dict[str, dict[str, Any]]:
    """Compute the golden tensors in two fresh interpreters, at once.

    Returns what each saved, under ``default`` (ATEN_CPU_CAPABILITY=default)
    and ``native`` (the variable unset).
    """
    processes = {}
    for run in ("default", "native"):
        env = dict(os.environ)
        env.pop("ATEN_CPU_CAPABILITY", None)
        if run == "default":
            env["ATEN_CPU_CAPABILITY"] = "default"
        command = [sys.executable, __file__, str(tmp_path / f"{run}.pt")]
        processes[run] = subprocess.Popen(
            command, env=env, stderr=subprocess.PIPE, text=True
        )
    saved = {}
    for run, process in processes.items():
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr
        saved[run] = torch.load(tmp_path / f"{run}.pt")
    return saved


def test_capability_digests(tmp_path: Path) -> None:
    """Compare the golden tensors under ATEN_CPU_CAPABILITY=default and native.

    Every CPU can run the scalar kernels, so the DEFAULT digests are checked
    on any machine. The native values differ from them in the last bits, and
    ``pytest -s`` prints by how much.
    """
    saved = run_golden(tmp_path)
    scalar = saved["default"]
    native = saved["native"]
    capability = torch.backends.cpu.get_cpu_capability()
    assert scalar["capability"] == "DEFAULT"
    assert native["capability"] == capability
    scalar_tensors = scalar["tensors"]
    native_tensors = native["tensors"]
    for name, tensor in scalar_tensors.items():
        assert digest(tensor) == GOLDEN_DIGESTS["DEFAULT"][name], name

    differing = {}
    print(f"native CPU capability: {capability}")
    for name, tensor in native_tensors.items():
        other = scalar_tensors[name]
        if torch.equal(tensor, other):
            continue
        max_abs = float((tensor.double() - other.double()).abs().max())
        relative = diff_in_eps(tensor, other)
        count = int((tensor != other).sum())
        differing[name] = count
        print(
            f"{name}: {count} of {tensor.numel()} elements differ, max abs diff "
            f"{max_abs:.3g} = {relative:.2f} eps x max |value|"
        )
        assert relative <= MAX_CAPABILITY_EPS, name
    if capability == "DEFAULT":
        assert differing == {}
    elif capability in CAPABILITY_DIFFERENCES:
        assert differing == CAPABILITY_DIFFERENCES[capability]


ELEMENTWISE = {
    "uniform": "{scheme: uniform, a: -0.05, b: 0.05}",
    "normal": "{scheme: normal, std: 0.02}",
    "trunc_normal": "{scheme: trunc_normal, std: 0.02, a: -0.04, b: 0.04}",
    "xavier_uniform": "xavier_uniform",
    "xavier_normal": "xavier_normal",
    "kaiming_uniform": "{scheme: kaiming_uniform, nonlinearity: relu}",
    "kaiming_normal": "{scheme: kaiming_normal, mode: fan_out, nonlinearity: relu}",
    "variance_scaling": "variance_scaling",
    "variance_scaling-normal": (
        "{scheme: variance_scaling, distribution: normal, mode: fan_avg}"
    ),
    "variance_scaling-uniform": (
        "{scheme: variance_scaling, distribution: uniform, mode: fan_out, scale: 2.0}"
    ),
    "lecun_normal": "lecun_normal",
}


def weight_policy(init: str) -> initrules.Policy:
    text = f"rules:\n  - {{match: {{param: weight}}, init: {init}}}\n"
    return initrules.load_policy(text=text)


def holder(*shape: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Return a module with one parameter, canonical name ``weight``."""
    module = nn.Module()
    module.weight = nn.Parameter(torch.empty(*shape, dtype=dtype))
    return module


def chunks(tensor: torch.Tensor) -> list[torch.Tensor]:
    return list(tensor.detach().reshape(-1).split(CHUNK_ELEMENTS))


def test_elementwise_covers_registry() -> None:
    covered = {case.split("-")[0] for case in ELEMENTWISE}
    drawn = {name for name in scheme_names() if get_scheme(name).draw is not None}
    assert covered == drawn


# 5359 x 587 = 3 * 2**20 + 5 elements: three full chunks and one of 5.
THREAD_SHAPE = (5359, 587)


@pytest.mark.parametrize("case", ELEMENTWISE)
def test_threads_same_values(case: str) -> None:
    policy = weight_policy(ELEMENTWISE[case])
    module = holder(*THREAD_SHAPE)
    original = torch.get_num_threads()
    results = {}
    try:
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            initrules.apply(module, policy, seed=5)
            results[threads] = module.weight.detach().clone()
    finally:
        torch.set_num_threads(original)
    assert torch.equal(results[2], results[1])
    assert torch.equal(results[4], results[1])


@pytest.mark.parametrize("case", ELEMENTWISE)
def test_chunked_statistics(case: str) -> None:
    # 1025 x 1024 = 2**20 + 1024 elements, so chunk 1 contains 1024.
    linear = nn.Linear(1024, 1025, bias=False)
    report = initrules.apply(linear, weight_policy(ELEMENTWISE[case]), seed=5)
    first, second = chunks(linear.weight)
    same = (first[: second.numel()] == second).double().mean()
    assert report.ok
    assert report.checked
    assert same < 1e-3


def test_seed_changes_every_chunk() -> None:
    policy = weight_policy(ELEMENTWISE["normal"])
    module = holder(*THREAD_SHAPE)
    initrules.apply(module, policy, seed=5)
    before = chunks(module.weight.clone())
    initrules.apply(module, policy, seed=6)
    after = chunks(module.weight)
    assert len(after) == 4
    for index, (old, new) in enumerate(zip(before, after, strict=True)):
        assert not torch.equal(old, new), index


def normal_stream(numel: int, seed: int, name: str) -> torch.Tensor:
    """Draw N(0, 0.02) values chunk by chunk, as initrules.stream defines them."""
    pieces = []
    for index in range(math.ceil(numel / CHUNK_ELEMENTS)):
        size = min(CHUNK_ELEMENTS, numel - index * CHUNK_ELEMENTS)
        generator = torch.Generator().manual_seed(derive_seed(seed, name, index))
        piece = torch.empty(size)
        Draw("normal", 0.0, 0.02).sample_(piece, generator)
        pieces.append(piece)
    return torch.cat(pieces)


def test_chunks_follow_format() -> None:
    module = holder(*THREAD_SHAPE)
    initrules.apply(module, weight_policy(ELEMENTWISE["normal"]), seed=5)
    expected = normal_stream(module.weight.numel(), 5, "weight")
    assert torch.equal(module.weight.detach().reshape(-1), expected)


def test_noncontiguous_row_major() -> None:
    module = nn.Module()
    module.weight = nn.Parameter(torch.empty(1030, 1025).t())
    initrules.apply(module, weight_policy(ELEMENTWISE["normal"]), seed=5)
    expected = normal_stream(module.weight.numel(), 5, "weight")
    assert not module.weight.is_contiguous()
    assert torch.equal(module.weight.detach().reshape(-1), expected)


def test_exact_chunk_unchunked() -> None:
    policy = weight_policy(ELEMENTWISE["normal"])
    exact = holder(1024, 1024)
    larger = holder(1025, 1024)
    initrules.apply(exact, policy, seed=5)
    initrules.apply(larger, policy, seed=5)
    generator = torch.Generator().manual_seed(derive_seed(5, "weight"))
    expected = torch.empty(1024, 1024).normal_(0.0, 0.02, generator=generator)
    prefix = larger.weight.detach().reshape(-1)[:CHUNK_ELEMENTS]
    assert torch.equal(exact.weight, expected)
    assert not torch.equal(prefix, exact.weight.detach().reshape(-1))


def test_derive_seed_pinned() -> None:
    assert derive_seed(0, "weight") == 7902309288099412196
    assert derive_seed(0, "weight", 3) == 7179483301600410699


@pytest.mark.parametrize("chunk", [None, 0, 3])
@pytest.mark.parametrize("seed", [0, -1, 2**70])
def test_derive_seed_63_bits(seed: int, chunk: int | None) -> None:
    value = derive_seed(seed, "transformer.wte.weight", chunk)
    assert value >= 0
    assert value < 2**63


if __name__ == "__main__":
    torch.save(
        {
            "capability": torch.backends.cpu.get_cpu_capability(),
            "tensors": golden_tensors(),
        },
        sys.argv[1],
    )


def test_seeded_sparse_repeats_and_leaves_the_global_generator() -> None:
    policy = initrules.load_policy(
        text="rules:\n"
        "  - {match: {param: weight}, init: {scheme: sparse, sparsity: 0.5}}\n"
        "  - {match: {param: bias}, init: zeros}\n"
    )
    first, second = nn.Linear(16, 16), nn.Linear(16, 16)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    initrules.apply(first, policy, seed=0)
    initrules.apply(second, policy, seed=0)
    assert torch.equal(first.weight, second.weight)
    assert torch.equal(torch.get_rng_state(), state)


def test_seeded_orthogonal_does_not_depend_on_threads() -> None:
    # LAPACK's QR rounds differently on different thread counts.
    policy = initrules.load_policy(
        text="rules:\n  - {match: {param: weight}, init: orthogonal}"
        "\n  - {match: {param: bias}, init: zeros}\n"
    )
    threads = torch.get_num_threads()
    weights = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            model = nn.Linear(600, 600)
            initrules.apply(model, policy, seed=11)
            weights.append(model.weight.detach())
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(weights[0], weights[1])
    assert torch.get_num_threads() == threads


class Mixed(nn.Module):
    """Tensors of uneven sizes and dtypes, which share one pool of draws."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(48, 40) for _ in range(12))
        # Two chunks and three rows more, with a small bias.
        self.wide = nn.Linear(1024, 2 * 1024 + 3)
        self.narrow = nn.Linear(64, 32, dtype=torch.bfloat16)
        # Split into 3 blocks along dim 0, so each block is contiguous.
        self.fused = nn.Linear(64, 3 * 64, bias=False)


MIXED_POLICY = initrules.load_policy(
    text="""
rules:
  - match: {name: fused.weight}
    init: {scheme: normal, std: 0.02, chunks: 3, dim: 0}
  - {match: {param: weight}, init: {scheme: normal, std: 0.02}}
  - {match: {param: bias}, init: {scheme: uniform, a: -0.1, b: 0.1}}
"""
)


def expected_mixed(seed: int) -> dict[str, torch.Tensor]:
    """Draw every tensor of Mixed by the stream's format, one tensor at a time."""
    model = Mixed()
    expected = {}
    for name, param in model.named_parameters():
        if name == "fused.weight":
            blocks = []
            for index in range(3):
                label = f"{name}[chunk {index} of 3, dim 0]"
                generator = torch.Generator().manual_seed(derive_seed(seed, label))
                blocks.append(
                    torch.empty(64, 64).normal_(0.0, 0.02, generator=generator)
                )
            expected[name] = torch.cat(blocks)
            continue
        if param.numel() > CHUNK_ELEMENTS:
            expected[name] = normal_stream(param.numel(), seed, name).view(param.shape)
            continue
        generator = torch.Generator().manual_seed(derive_seed(seed, name))
        values = torch.empty(param.shape)
        if name.endswith("bias"):
            values.uniform_(-0.1, 0.1, generator=generator)
        else:
            values.normal_(0.0, 0.02, generator=generator)
        expected[name] = values.to(param.dtype)
    return expected


def test_pooled_draws_thread_independent() -> None:
    expected = expected_mixed(seed=11)
    original = torch.get_num_threads()
    try:
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            model = Mixed()
            report = initrules.apply(model, MIXED_POLICY, seed=11)
            assert report.ok, threads
            for name, param in model.named_parameters():
                assert torch.equal(param.detach(), expected[name]), (threads, name)
    finally:
        torch.set_num_threads(original)


class FailingDraw(Draw):
    """A valid distribution whose sampling fails, as a broken custom draw might."""

    def sample_(self, out: torch.Tensor, generator: torch.Generator | None) -> None:
        raise RuntimeError("sampling failed")


def custom_scheme(name: str, draw: Draw) -> Any:
    """Register a scheme that always draws from ``draw``; return its name."""
    from initrules import schemes

    scheme = schemes.Scheme(
        name,
        schemes.NoArgs,
        lambda tensor, args, context: draw.sample_(tensor, context.generator),
        random=True,
        draw=lambda shape, args: draw,
    )
    initrules.register_scheme(scheme)
    return name


@pytest.fixture
def failing_draw() -> Any:
    from initrules import schemes

    yield custom_scheme("test_failing_draw", FailingDraw("normal", 0.0, 0.02))
    schemes._REGISTRY.pop("test_failing_draw", None)


@pytest.fixture
def negative_std() -> Any:
    from initrules import schemes

    yield custom_scheme("test_negative_std", Draw("normal", 0.0, -1.0))
    schemes._REGISTRY.pop("test_negative_std", None)


def test_failed_pooled_draw_names_tensor(failing_draw: str) -> None:
    policy = initrules.load_policy(
        text=f"rules:\n  - {{match: {{}}, init: {failing_draw}}}\n"
    )
    with pytest.raises(initrules.ApplyError) as caught:
        initrules.apply(nn.Linear(8, 4), policy, seed=0)
    message = str(caught.value)
    assert "failed on 'weight'" in message
    assert "RuntimeError: sampling failed" in message
    assert "other tensors were written on parallel threads" in message


def test_invalid_custom_draw_plan_error(negative_std: str) -> None:
    policy = initrules.load_policy(
        text=f"rules:\n  - {{match: {{}}, init: {negative_std}}}\n"
    )
    model = nn.Linear(8, 4)
    before = model.weight.detach().clone()
    with pytest.raises(initrules.PlanError) as caught:
        initrules.apply(model, policy, seed=0)
    message = str(caught.value)
    assert "cannot initialize 'weight'" in message
    assert "the normal draw has a negative std, -1.0" in message
    assert torch.equal(model.weight.detach(), before)
