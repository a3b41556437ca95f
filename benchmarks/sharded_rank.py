"""One rank of ``bench.py --distributed``: time the sharded fill of one model.

Usage: python benchmarks/sharded_rank.py RANK WORLD PORT OUT_JSON MODEL [--quick]

MODEL is ``gpt2`` (GPT-2 small) or ``llama-wide`` (a 4-layer Llama of width
2048). The rank joins a gloo group on 127.0.0.1:PORT, builds the model on
the meta device, shards it with FSDP2 (``fully_shard`` per block, then the
whole model), allocates it with ``to_empty`` and times
``initrules.apply`` with every check off, so that the figure is the
generation of its shards alone. It writes the median seconds and its peak
resident memory to OUT_JSON.
"""

import datetime
import faulthandler
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import initrules
from initrules.schema import Checks

POLICIES = Path(__file__).parents[1] / "policies"

# A rank draws its share of each tensor above the stream's chunk size (2**20
# elements), rounded out to whole chunks, and the whole of each smaller
# tensor. GPT-2 small (124M parameters) has many tensors of 1 to 4 chunks,
# where that rounding weighs. The wide Llama (243M) has tensors of 4 to 64.
MODELS: dict[str, tuple[Callable[[bool], nn.Module], str]] = {}


def gpt2(quick: bool) -> nn.Module:
    """Return GPT-2 small, or a tiny one for --quick."""
    sizes = {"n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257}
    if quick:
        sizes = {"n_layer": 2, "n_embd": 128, "n_head": 4, "vocab_size": 4000}
        sizes |= {"bos_token_id": 0, "eos_token_id": 0}
    return GPT2LMHeadModel(GPT2Config(**sizes))


def llama_wide(quick: bool) -> nn.Module:
    """Return a 4-layer Llama of width 2048 with untied embeddings, or a tiny one."""
    config = LlamaConfig(
        hidden_size=128 if quick else 2048,
        intermediate_size=344 if quick else 5504,
        num_hidden_layers=2 if quick else 4,
        num_attention_heads=4 if quick else 16,
        num_key_value_heads=2 if quick else 4,
        vocab_size=4000 if quick else 16000,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


MODELS["gpt2"] = (gpt2, "gpt2.yaml")
MODELS["llama-wide"] = (llama_wide, "llama.yaml")


def blocks(model: nn.Module) -> nn.ModuleList:
    """Return the model's repeated blocks, each sharded on its own."""
    if isinstance(model, GPT2LMHeadModel):
        return model.transformer.h
    return model.model.layers


def peak_rss_kib() -> float:
    """Return this process's own peak resident memory (VmHWM), in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return float(line.split()[1])
    return float("nan")


def main() -> None:
    """Join the group, build and shard the model, time its fill, save the figures."""
    rank, world, port = (int(arg) for arg in sys.argv[1:4])
    out = Path(sys.argv[4])
    factory, policy_file = MODELS[sys.argv[5]]
    quick = "--quick" in sys.argv[6:]
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=300),
    )
    torch.set_num_threads(1)
    try:
        with torch.device("meta"):
            model = factory(quick)
        mesh = init_device_mesh("cpu", (world,))
        for block in blocks(model):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        model.to_empty(device="cpu")
        policy = initrules.load_policy(POLICIES / policy_file)
        policy = policy.model_copy(update={"checks": Checks(enabled=False)})
        repeats = 1 if quick else 5
        seconds = []
        for _ in range(repeats):
            dist.barrier()
            start = time.perf_counter()
            initrules.apply(model, policy, seed=0)
            seconds.append(time.perf_counter() - start)
        parameters = sum(param.numel() for param in model.parameters())
        out.write_text(
            json.dumps(
                {
                    "seconds": statistics.median(seconds),
                    "peak_rss_kib": peak_rss_kib(),
                    "parameters": parameters,
                }
            )
        )
        # The ranks leave together: one that tears its group down while a
        # peer still sends to it can abort inside gloo.
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    # Print the Python stack if the process aborts.
    faulthandler.enable()
    main()
    # NOTE: a rank sometimes aborted after its results were written, with
    # "terminate called without an active exception" (2 of about 20 runs).
    # os._exit skips the interpreter's teardown, where gloo's remaining
    # objects are destroyed and the abort most likely came from.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
