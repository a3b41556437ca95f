"""Catch an absurd but finite initialization before it is written.

The policy in ``absurd_init.yaml`` draws every Linear weight from
normal(mean=100, std=0.1). Every value would be finite and the policy is
valid YAML, but the weights of a linear map should be centred on zero with a
spread near sqrt(2 / fan_in). initrules' scale check sees this from the rule's
arguments alone, so ``initrules.apply`` raises a ``CheckError`` before writing
anything, and the model keeps the values it had.

Run it from the repository root:

    python examples/absurd_init.py
"""

from pathlib import Path

import torch
from torch import nn

import initrules

POLICY = Path(__file__).parent / "absurd_init.yaml"


def build_model() -> nn.Sequential:
    """Build a two-layer MLP with torch's default initialization."""
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def main() -> None:
    model = build_model()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    try:
        initrules.apply(model, POLICY, seed=0)
    except initrules.CheckError as error:
        # The report lists each failed check with the tensor, the value the
        # rule's arguments imply and the accepted range.
        print(error.report)
    else:
        print("the policy was applied; no check failed")
    unchanged = all(
        torch.equal(before[name], value) for name, value in model.state_dict().items()
    )
    print(f"weights unchanged: {unchanged}")


if __name__ == "__main__":
    main()
