"""Initialize a nested model: a Conv2d followed by a Sequential head.

The policy in ``nested_model.yaml`` gives the convolution Kaiming normal with
``mode: fan_out`` and ``nonlinearity: relu``, the first Linear of the head Xavier
normal, the second Linear a normal draw with std 0.01, and every bias zeros. It
shows two ways to tell apart layers of the same class inside a Sequential: by
their dotted name (``head.0.weight``), or by ``within: Sequential`` together
with rule order.

Run it from the repository root:

    python examples/nested_model.py
"""

from pathlib import Path

import torch
from torch import nn

import initrules

POLICY = Path(__file__).parent / "nested_model.yaml"

IMAGE_SIZE = 8
IN_CHANNELS = 3
CONV_CHANNELS = 8
HIDDEN_FEATURES = 32
NUM_CLASSES = 10


class NestedNet(nn.Module):
    """A 3x3 convolution on 8x8 images, then a Linear-ReLU-Linear classifier head.

    Parameter names: ``conv.weight``, ``conv.bias``, ``head.0.weight``,
    ``head.0.bias``, ``head.2.weight`` and ``head.2.bias`` (``head.1`` is the ReLU).
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(IN_CHANNELS, CONV_CHANNELS, kernel_size=3, padding=1)
        self.head = nn.Sequential(
            nn.Linear(CONV_CHANNELS * IMAGE_SIZE * IMAGE_SIZE, HIDDEN_FEATURES),
            nn.ReLU(),
            nn.Linear(HIDDEN_FEATURES, NUM_CLASSES),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = torch.relu(self.conv(images))
        return self.head(torch.flatten(features, start_dim=1))


def build_model() -> NestedNet:
    """Build the example model with torch's default initialization."""
    return NestedNet()


def main() -> None:
    model = build_model()
    report = initrules.apply(model, POLICY, seed=0)
    print(report)
    print()

    # The two Linear layers share a class but got different rules.
    for name in ("head.0.weight", "head.2.weight"):
        row = report.row(name)
        print(f"{name}: rule {row.rule_name!r}, scheme {row.scheme}, args {row.args}")

    # The initialized model runs as usual.
    logits = model(torch.zeros(2, IN_CHANNELS, IMAGE_SIZE, IMAGE_SIZE))
    print(f"logits shape for a batch of 2: {tuple(logits.shape)}")


if __name__ == "__main__":
    main()
