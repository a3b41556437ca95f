"""Linting against a model builds it on the meta device, so no weights are allocated."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]

# Llama 3.2 1B's shape: about 1.24 billion parameters, 4.9 GB in float32.
LLAMA_1B = [
    "hidden_size=2048",
    "intermediate_size=8192",
    "num_hidden_layers=16",
    "num_attention_heads=32",
    "num_key_value_heads=8",
    "vocab_size=128256",
]

SCRIPT = """
import os, resource, sys
os.environ["HF_HUB_OFFLINE"] = "1"
from initrules.cli import main
from initrules.factory import build_model, parse_model_args
arguments = parse_model_args(sys.argv[2:])
model = build_model("transformers:LlamaForCausalLM", arguments, device="meta")
print("parameters", sum(p.numel() for p in model.parameters()))
model_args = [item for value in sys.argv[2:] for item in ("--model-arg", value)]
code = main(["lint", sys.argv[1], "--model", "transformers:LlamaForCausalLM",
             *model_args, "--fail-on", "warning"])
print("exit", code)
print("peak_rss_kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_lint_of_1b_llama_stays_under_1_gib() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            SCRIPT,
            str(ROOT / "policies" / "llama.yaml"),
            *LLAMA_1B,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    values = dict(
        line.split(" ", 1) for line in result.stdout.splitlines() if " " in line
    )
    assert int(values["parameters"]) > 1_000_000_000
    assert values["exit"] == "0", result.stdout
    peak_mib = int(values["peak_rss_kib"]) / 1024
    assert peak_mib < 1024, f"peak RSS {peak_mib:.0f} MiB"
