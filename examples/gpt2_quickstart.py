"""Initialize a GPT-2 language model with the shipped policy and print the report.

The model is built from ``GPT2Config`` (12 layers, as in the released GPT-2
small, with a smaller width so that it runs in seconds on a CPU), so nothing
is downloaded. Run from the repository root::

    python examples/gpt2_quickstart.py
"""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import GPT2Config, GPT2LMHeadModel

import initrules

POLICY = Path(__file__).resolve().parents[1] / "policies" / "gpt2.yaml"


def main() -> None:
    # GPT-2's special tokens default to id 50256; keep them inside the vocabulary.
    config = GPT2Config(
        n_layer=12,
        n_embd=128,
        n_head=4,
        vocab_size=2048,
        n_positions=256,
        bos_token_id=2047,
        eos_token_id=2047,
    )
    model = GPT2LMHeadModel(config)
    report = initrules.apply(model, POLICY, seed=0)
    print(report)
    tied = model.lm_head.weight is model.transformer.wte.weight
    print(f"lm_head.weight still tied to transformer.wte.weight: {tied}")


if __name__ == "__main__":
    main()
