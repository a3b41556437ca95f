"""One rank of a sharded-initialization test, started by tests/test_sharded.py.

Usage: python tests/_sharded_worker.py SCENARIO RANK WORLD PORT OUT_DIR

The rank joins a gloo process group on 127.0.0.1:PORT, builds the scenario's
model sharded over all ranks, initializes it with initrules, and saves what
the test compares with a single-process run to OUT_DIR/rank{RANK}.pt.
"""

import datetime
import faulthandler
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import (
    DTensor,
    Partial,
    Replicate,
    Shard,
    distribute_tensor,
)
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    parallelize_module,
)
from torch.distributed.tensor.placement_types import _StridedShard
from transformers import LlamaConfig, LlamaForCausalLM

import initrules

POLICIES = Path(__file__).parents[1] / "policies"
SEED = 7

# vocab_size 1001 makes the embedding's rows split unevenly over 2 or 3 ranks.
LLAMA = {
    "hidden_size": 128,
    "intermediate_size": 344,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1001,
}

# Every kind of scheme, on tensors above and below the stream's chunk size
# (2**20 elements), in float32 and bfloat16.
MIXED_POLICY = """
rules:
  - match: {name: big.weight}
    init: {scheme: normal, std: 0.02}
  - match: {name: wide.weight}
    init: {scheme: xavier_uniform}
  - match: {name: table.weight}
    init: {scheme: trunc_normal, std: 0.5, a: -1.0, b: 1.0}
  - match: {name: narrow.weight}
    init: {scheme: kaiming_uniform, nonlinearity: relu}
  - match: {name: rotation.weight}
    init: orthogonal
  - match: {name: identity.weight}
    init: eye
  - match: {name: fused.weight}
    init: {scheme: xavier_normal, chunks: 3}
  - match: {param: bias}
    init: {scheme: constant, val: 0.1}
"""


SIMPLE_POLICY = """
rules:
  - {match: {param: weight}, init: {scheme: normal, std: 0.1}}
  - {match: {param: bias}, init: zeros}
"""

KEEP_POLICY = """
rules:
  - match: {name: a.weight}
    init: keep
  - match: {name: b.weight, chunk: [0, 2]}
    init: {scheme: normal, std: 0.5}
  - match: {name: b.weight}
    init: keep
  - match: {name: table.weight}
    init: {scheme: normal, std: 0.02}
  - match: {name: tiny.weight}
    init: {scheme: normal, std: 0.02}
  - match: {param: bias}
    init: keep
"""


def edge_model() -> nn.Module:
    """Kept tensors and blocks, and embeddings with a padding row.

    ``table`` is above the stream's chunk size; ``tiny`` has fewer rows than
    three ranks, so one rank's shard is empty.
    """
    model = nn.ModuleDict(
        {
            "a": nn.Linear(16, 12),
            "b": nn.Linear(16, 12),
            "table": nn.Embedding(1100, 1000, padding_idx=3),
            "tiny": nn.Embedding(2, 600, padding_idx=0),
        }
    )
    return model


def fill_known_values(model: nn.Module) -> None:
    """Give every parameter values that a kept tensor must still hold after init."""
    with torch.no_grad():
        for index, param in enumerate(model.parameters()):
            local = param.to_local() if isinstance(param, DTensor) else param
            local.fill_(0.25 + index)


def llama_config(**overrides: Any) -> LlamaConfig:
    return LlamaConfig(**{**LLAMA, **overrides})


def mixed_model() -> nn.Module:
    return nn.ModuleDict(
        {
            "big": nn.Linear(2048, 1100),
            "wide": nn.Linear(1500, 1003),
            "table": nn.Embedding(1001, 1100),
            "narrow": nn.Linear(900, 1300, dtype=torch.bfloat16),
            "rotation": nn.Linear(96, 64),
            "identity": nn.Linear(40, 40),
            "fused": nn.Linear(64, 3 * 64),
        }
    )


def fsdp_blocks(mesh: DeviceMesh) -> Callable[[nn.Module], None]:
    """Shard each decoder layer and then the whole model, as torchtitan does."""

    def parallelize(model: nn.Module) -> None:
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)

    return parallelize


def fsdp_children(mesh: DeviceMesh) -> Callable[[nn.Module], None]:
    """Shard each child; a ModuleDict has no forward for FSDP to wrap."""

    def parallelize(model: nn.Module) -> None:
        for child in model.children():
            fully_shard(child, mesh=mesh)

    return parallelize


def two_dim_placements(mesh: DeviceMesh) -> Callable[[nn.Module], None]:
    """Shard dim 0 over the mesh's first axis and dim 1 over its second."""

    def parallelize(model: nn.Module) -> None:
        for module in model.modules():
            for name, param in list(module._parameters.items()):
                if param is None or isinstance(param, DTensor):
                    continue
                placements = (
                    [Shard(0), Shard(1)]
                    if param.dim() == 2
                    else [Shard(0), Replicate()]
                )
                sharded = distribute_tensor(param.detach(), mesh, placements)
                module._parameters[name] = nn.Parameter(sharded)

    return parallelize


def tensor_and_fully_sharded(mesh: DeviceMesh) -> Callable[[nn.Module], None]:
    """Tensor-parallel MLPs on the "tp" axis, FSDP2 on the "dp" axis.

    ``down_proj`` becomes row-wise parallel, ``Shard(1)`` on "tp", and FSDP
    adds ``Shard(0)`` on "dp", the layout torchtitan uses.
    """

    def parallelize(model: nn.Module) -> None:
        plan = {
            "gate_proj": ColwiseParallel(),
            "up_proj": ColwiseParallel(),
            "down_proj": RowwiseParallel(),
        }
        for layer in model.model.layers:
            parallelize_module(layer.mlp, mesh["tp"], plan)
            fully_shard(layer, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])

    return parallelize


def count_log_records() -> list[logging.LogRecord]:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    root = logging.getLogger("initrules")
    root.setLevel(logging.INFO)
    root.addHandler(Keep())
    return records


def full_values(model: nn.Module) -> dict[str, torch.Tensor]:
    """Gather every parameter whole (a collective) and copy every buffer."""
    values = {}
    for name, param in model.named_parameters():
        value = param.full_tensor() if isinstance(param, DTensor) else param
        values[name] = value.detach().clone()
    for name, buffer in model.named_buffers():
        values[name] = buffer.detach().clone()
    return values


def local_shards(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: param.to_local().detach().clone()
        for name, param in model.named_parameters()
        if isinstance(param, DTensor)
    }


def report_stats(report: initrules.Report) -> dict[str, tuple[float, float]]:
    return {
        row.label: (row.mean, row.std)
        for row in report.rows
        if row.mean is not None and row.std is not None
    }


def run(scenario: str, rank: int, world: int) -> dict[str, Any]:
    records = count_log_records()
    if scenario == "llama":
        mesh = init_device_mesh("cpu", (world,))
        model, report = initrules.build(
            lambda: LlamaForCausalLM(llama_config()),
            POLICIES / "llama.yaml",
            seed=SEED,
            parallelize=fsdp_blocks(mesh),
        )
        ids = (torch.arange(32).view(2, 16) * 37) % LLAMA["vocab_size"]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return {
            "values": full_values(model),
            "local": local_shards(model),
            "stats": report_stats(report),
            "loss": float(loss.detach()),
            "records": len(records),
        }
    if scenario == "tied":
        mesh = init_device_mesh("cpu", (world,))
        model, _ = initrules.build(
            lambda: LlamaForCausalLM(llama_config(tie_word_embeddings=True)),
            POLICIES / "llama.yaml",
            seed=SEED,
            parallelize=fsdp_blocks(mesh),
        )
        tied = model.lm_head.weight is model.model.embed_tokens.weight
        return {"values": full_values(model), "tied": tied}
    if scenario == "mixed":
        mesh = init_device_mesh("cpu", (world,))
        model, report = initrules.build(
            mixed_model,
            initrules.load_policy(text=MIXED_POLICY),
            seed=SEED,
            parallelize=fsdp_children(mesh),
        )
        return {
            "values": full_values(model),
            "local": local_shards(model),
            "stats": report_stats(report),
        }
    if scenario in ("mesh2d", "tp_fsdp"):
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
        layout = (
            two_dim_placements if scenario == "mesh2d" else tensor_and_fully_sharded
        )
        model, report = initrules.build(
            lambda: LlamaForCausalLM(llama_config()),
            POLICIES / "llama.yaml",
            seed=SEED,
            parallelize=layout(mesh),
        )
        down = model.model.layers[0].mlp.down_proj.weight
        return {
            "values": full_values(model),
            "stats": report_stats(report),
            "down_proj": [str(placement) for placement in down.placements],
        }
    if scenario == "edges":
        return edge_cases(rank, world)
    if scenario == "rank_var":
        mesh = init_device_mesh("cpu", (world,))
        model = nn.Sequential(nn.Linear(8, 8, device="meta"))
        fully_shard(model, mesh=mesh)
        model.to_empty(device="cpu")
        policy = initrules.load_policy(
            text="vars: {scale: 1}\n"
            "rules:\n"
            "  - match: {param: weight}\n"
            "    init: {scheme: normal, std: '0.02 * scale'}\n"
            "  - {match: {param: bias}, init: zeros}\n"
        )
        try:
            initrules.apply(model, policy, seed=SEED, vars={"scale": rank + 1})
        except initrules.PlanError as error:
            return {"error": str(error)}
        return {"error": None}
    raise ValueError(f"unknown scenario {scenario!r}")


def raised(action: Callable[[], object]) -> str | None:
    """Run ``action``; return the text of the initrules error it raised, if any."""
    try:
        action()
    except initrules.InitRulesError as error:
        return f"{type(error).__name__}: {error}"
    return None


def edge_cases(rank: int, world: int) -> dict[str, Any]:
    mesh = init_device_mesh("cpu", (world,))
    results: dict[str, Any] = {}

    model = edge_model()
    for child in model.values():
        fully_shard(child, mesh=mesh)
    fill_known_values(model)
    report = initrules.apply(model, initrules.load_policy(text=KEEP_POLICY), seed=SEED)
    results["edge_values"] = full_values(model)
    results["edge_stats"] = report_stats(report)

    strided = nn.Linear(4, 12)
    placement = [_StridedShard(0, split_factor=2)]
    strided.weight = nn.Parameter(
        distribute_tensor(strided.weight.detach(), mesh, placement)
    )
    strided.bias = nn.Parameter(
        distribute_tensor(strided.bias.detach(), mesh, [Replicate()])
    )
    initrules.apply(strided, initrules.load_policy(text=SIMPLE_POLICY), seed=SEED)
    results["strided"] = full_values(strided)

    partial = nn.Linear(4, 4)
    partial.weight = nn.Parameter(
        DTensor.from_local(torch.zeros(4, 4), mesh, [Partial()])
    )
    results["partial"] = raised(
        lambda: initrules.apply(
            partial, initrules.load_policy(text=SIMPLE_POLICY), seed=SEED
        )
    )

    seeded = nn.Sequential(nn.Linear(8, 8))
    fully_shard(seeded, mesh=mesh)
    results["seed_per_rank"] = raised(
        lambda: initrules.apply(seeded, POLICIES / "llama.yaml", seed=rank)
    )

    gathered = nn.Sequential(nn.Linear(8, 8))
    fully_shard(gathered, mesh=mesh, reshard_after_forward=False)
    gathered(torch.zeros(2, 8))
    results["unsharded"] = raised(
        lambda: initrules.apply(gathered, POLICIES / "llama.yaml", seed=SEED)
    )

    scaled = initrules.load_policy(
        text="vars: {scale: 1}\n"
        "rules:\n"
        "  - match: {param: weight}\n"
        "    init: {scheme: normal, std: '0.02 * scale'}\n"
        "  - {match: {param: bias}, init: zeros}\n"
    )
    results["build_rank_var"] = raised(
        lambda: initrules.build(
            lambda: nn.Sequential(nn.Linear(8, 8)),
            scaled,
            seed=SEED,
            vars={"scale": 1 - 2 * rank},
            parallelize=lambda m: fully_shard(m, mesh=mesh),
        )
    )

    # Two rows over three ranks: the third rank's shard is empty and it
    # writes nothing, yet it must raise with the others.
    initrules.register_scheme("always_fails", random=False)(fail_to_fill)
    failing = nn.Sequential(nn.Linear(4, 2))
    fully_shard(failing, mesh=mesh)
    failing_policy = initrules.load_policy(
        text="rules:\n"
        "  - {match: {param: weight}, init: always_fails}\n"
        "  - {match: {param: bias}, init: zeros}\n"
    )
    results["write_failure"] = raised(
        lambda: initrules.apply(failing, failing_policy, seed=SEED)
    )
    return results


def fail_to_fill(tensor: torch.Tensor, args: object, context: object) -> None:
    raise RuntimeError("this scheme always fails")


def main() -> None:
    scenario, rank, world, port, out = sys.argv[1:6]
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=int(rank),
        world_size=int(world),
        timeout=datetime.timedelta(seconds=60),
    )
    # One thread per rank: the ranks share the machine's cores.
    torch.set_num_threads(1)
    try:
        result = run(scenario, int(rank), int(world))
        torch.save(result, Path(out) / f"rank{rank}.pt")
        # The ranks leave together: one that tears its group down while a
        # peer still sends to it can abort inside gloo.
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    # Print the Python stack if the process aborts.
    faulthandler.enable()
    main()
    # Skip the interpreter's teardown, where gloo's remaining objects are
    # destroyed: a rank sometimes aborted there after writing its results.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
