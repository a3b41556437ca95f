"""Sharded initialization (FSDP2 and DTensor placements) equals single-process results.

Each test starts gloo ranks on 127.0.0.1, on a free port the test picks,
running tests/_sharded_worker.py. Every rank saves what it saw, and the test
compares that with a single-process build of the same model, policy and
seed. The ranks are killed when a test ends, whether it passed or not.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import contextlib
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from transformers import LlamaForCausalLM

import initrules

sys.path.insert(0, str(Path(__file__).parent))
import _sharded_worker as worker

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch was built without gloo",
)

WORKER = Path(__file__).parent / "_sharded_worker.py"
# Seconds a whole group of ranks may take, imports included, on a slow machine.
TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run_ranks(scenario: str, world: int, out: Path) -> list[dict[str, Any]]:
    """Run one scenario on ``world`` ranks; return what each rank saved."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(WORKER), scenario]
    ranks = [
        subprocess.Popen(
            [*command, str(rank), str(world), str(port), str(out)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(world)
    ]
    try:
        errors = [process.communicate(timeout=TIMEOUT_S)[1] for process in ranks]
    finally:
        for process in ranks:
            if process.poll() is None:
                process.kill()
                process.wait()
    for rank, (process, stderr) in enumerate(zip(ranks, errors, strict=True)):
        assert process.returncode == 0, f"rank {rank} failed:\n{stderr}"
    return [torch.load(out / f"rank{rank}.pt") for rank in range(world)]


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the block on one torch thread, as each rank does."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def reference(
    factory: Callable[[], nn.Module], policy: Path | initrules.Policy
) -> tuple[dict[str, torch.Tensor], initrules.Report, nn.Module]:
    """Build the model in this process, unsharded, with the workers' seed.

    One thread, as each rank uses: the QR factorization behind ``orthogonal``
    may round differently with more threads.
    """
    with one_thread():
        model, report = initrules.build(factory, policy, seed=worker.SEED)
    values = {name: param.detach() for name, param in model.named_parameters()}
    values.update(dict(model.named_buffers()))
    return values, report, model


def differing(
    expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]
) -> list[str]:
    assert expected.keys() == got.keys()
    return [name for name in expected if not torch.equal(expected[name], got[name])]


def llama_reference() -> tuple[dict[str, torch.Tensor], initrules.Report, nn.Module]:
    return reference(
        lambda: LlamaForCausalLM(worker.llama_config()),
        worker.POLICIES / "llama.yaml",
    )


@pytest.fixture(scope="module")
def llama_two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_ranks("llama", 2, tmp_path_factory.mktemp("llama"))


def test_fsdp_llama_is_bit_identical_to_one_process(
    llama_two_ranks: list[dict[str, Any]],
) -> None:
    expected, _, _ = llama_reference()
    for saved in llama_two_ranks:
        assert differing(expected, saved["values"]) == []
    # vocab_size 1001 splits the embedding into 501 and 500 rows.
    shards = [saved["local"]["model.embed_tokens.weight"] for saved in llama_two_ranks]
    assert [shard.shape[0] for shard in shards] == [501, 500]


def test_fsdp_llama_three_ranks(tmp_path: Path) -> None:
    expected, _, _ = llama_reference()
    for saved in run_ranks("llama", 3, tmp_path):
        assert differing(expected, saved["values"]) == []


def test_fsdp_llama_loss_matches_one_process(
    llama_two_ranks: list[dict[str, Any]],
) -> None:
    _, _, model = llama_reference()
    ids = (torch.arange(32).view(2, 16) * 37) % worker.LLAMA["vocab_size"]
    expected = float(model(input_ids=ids, labels=ids).loss.detach())
    for saved in llama_two_ranks:
        assert saved["loss"] == pytest.approx(expected, rel=1e-6)


def test_rope_buffers_equal_a_normal_construction(
    llama_two_ranks: list[dict[str, Any]],
) -> None:
    torch.manual_seed(0)
    plain = LlamaForCausalLM(worker.llama_config())
    buffers = dict(plain.named_buffers())
    assert buffers, "the model should have rotary buffers"
    for saved in llama_two_ranks:
        for name, buffer in buffers.items():
            assert torch.equal(saved["values"][name], buffer), name


def test_no_rank_repeats_another_ranks_shard(
    llama_two_ranks: list[dict[str, Any]],
) -> None:
    first, second = (saved["local"] for saved in llama_two_ranks)
    random = [
        name for name in first if name.endswith(("proj.weight", "embed_tokens.weight"))
    ]
    assert random
    for name in random:
        rows = min(first[name].shape[0], second[name].shape[0])
        # Not one row of rank 1's shard repeats the same row of rank 0's.
        same = (first[name][:rows] == second[name][:rows]).all(dim=-1)
        assert not bool(same.any()), name


def test_report_statistics_are_global(llama_two_ranks: list[dict[str, Any]]) -> None:
    _, report, _ = llama_reference()
    for saved in llama_two_ranks:
        stats = saved["stats"]
        assert stats.keys() == {row.label for row in report.rows}
        for row in report.rows:
            mean, std = stats[row.label]
            assert mean == pytest.approx(row.mean, rel=1e-6, abs=1e-9), row.label
            assert std == pytest.approx(row.std, rel=1e-6, abs=1e-9), row.label


def test_only_rank_zero_logs(llama_two_ranks: list[dict[str, Any]]) -> None:
    counts = [saved["records"] for saved in llama_two_ranks]
    assert counts[0] > 0
    assert counts[1:] == [0]


def test_tied_embeddings_under_fsdp(tmp_path: Path) -> None:
    expected, _, _ = reference(
        lambda: LlamaForCausalLM(worker.llama_config(tie_word_embeddings=True)),
        worker.POLICIES / "llama.yaml",
    )
    for saved in run_ranks("tied", 2, tmp_path):
        assert saved["tied"]
        assert differing(expected, saved["values"]) == []


def test_every_scheme_and_large_tensors(tmp_path: Path) -> None:
    policy = initrules.load_policy(text=worker.MIXED_POLICY)
    expected, report, _ = reference(worker.mixed_model, policy)
    # Tensors above the stream's chunk size take the per-chunk path.
    assert expected["big.weight"].numel() > 2 * 2**20
    results = run_ranks("mixed", 3, tmp_path)
    for saved in results:
        assert differing(expected, saved["values"]) == []
    for row in report.rows:
        _, std = results[0]["stats"][row.label]
        assert std == pytest.approx(row.std, rel=1e-6, abs=1e-9), row.label


def test_two_dim_mesh_of_four_ranks(tmp_path: Path) -> None:
    expected, _, _ = llama_reference()
    for saved in run_ranks("mesh2d", 4, tmp_path):
        assert saved["down_proj"] == ["S(0)", "S(1)"]
        assert differing(expected, saved["values"]) == []


def test_tensor_parallel_under_fsdp(tmp_path: Path) -> None:
    expected, _, _ = llama_reference()
    for saved in run_ranks("tp_fsdp", 4, tmp_path):
        # Row-wise parallel gives Shard(1) on "tp"; FSDP adds Shard(0) on "dp".
        assert saved["down_proj"] == ["S(0)", "S(1)"]
        assert differing(expected, saved["values"]) == []


def test_rank_dependent_plan_raises_everywhere(
    tmp_path: Path,
) -> None:
    results = run_ranks("rank_var", 2, tmp_path)
    for saved in results:
        assert saved["error"] is not None
        assert saved["error"].startswith(
            "the ranks made 2 different plans, one per group (rank 0; rank 1); "
        )


@pytest.fixture(scope="module")
def edge_cases(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_ranks("edges", 3, tmp_path_factory.mktemp("edges"))


def edge_reference() -> tuple[dict[str, torch.Tensor], initrules.Report]:
    """Apply the edge-case policy to the edge-case model in this process."""
    model = worker.edge_model()
    worker.fill_known_values(model)
    policy = initrules.load_policy(text=worker.KEEP_POLICY)
    with one_thread():
        report = initrules.apply(model, policy, seed=worker.SEED)
    values = {name: param.detach() for name, param in model.named_parameters()}
    return values, report


def test_kept_and_padded_tensors_match(
    edge_cases: list[dict[str, Any]],
) -> None:
    expected, report = edge_reference()
    # table.weight is above the chunk size: the per-rank range path.
    assert expected["table.weight"].numel() > 2**20
    assert torch.count_nonzero(expected["table.weight"][3]) == 0
    for saved in edge_cases:
        assert differing(expected, saved["edge_values"]) == []
        for row in report.rows:
            mean, std = saved["edge_stats"][row.label]
            assert mean == pytest.approx(row.mean, rel=1e-6, abs=1e-9), row.label
            assert std == pytest.approx(row.std, rel=1e-6, abs=1e-9), row.label


def test_strided_shard_matches(
    edge_cases: list[dict[str, Any]],
) -> None:
    model = nn.Linear(4, 12)
    policy = initrules.load_policy(text=worker.SIMPLE_POLICY)
    with one_thread():
        initrules.apply(model, policy, seed=worker.SEED)
    expected = {name: param.detach() for name, param in model.named_parameters()}
    for saved in edge_cases:
        assert differing(expected, saved["strided"]) == []


@pytest.mark.parametrize(
    ("case", "start"),
    [
        ("partial", "PlanError: rule 1 at <text>"),
        ("seed_per_rank", "PlanError: the ranks made 3 different plans"),
        ("unsharded", "PlanError: the FSDP2 module"),
        ("build_rank_var", "PlanError: the ranks made 3 different plans"),
        ("write_failure", "ApplyError: "),
    ],
)
def test_errors_raise_on_every_rank(
    edge_cases: list[dict[str, Any]], case: str, start: str
) -> None:
    for rank, saved in enumerate(edge_cases):
        assert saved[case] is not None, f"rank {rank} raised nothing"
        assert saved[case].startswith(start), saved[case]
