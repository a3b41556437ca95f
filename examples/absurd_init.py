"""Spot an absurd but finite initialization by reading the report's statistics.

The policy in ``absurd_init.yaml`` draws every Linear weight from
normal(mean=100, std=0.1). The values are finite and the policy is valid, so
``initrules.apply`` accepts it and writes them. The report's mean and std
columns make the mistake visible, and this script lists every tensor whose mean
lies far from zero compared with its spread.

Run it from the repository root:

    python examples/absurd_init.py
"""

from pathlib import Path

from torch import nn

import initrules

POLICY = Path(__file__).parent / "absurd_init.yaml"

# A row is suspicious when |mean| exceeds this many standard deviations. Weights
# drawn around zero have |mean| well below their std, so 10 leaves a wide margin.
MAX_MEAN_TO_STD = 10.0


def build_model() -> nn.Sequential:
    """Build a two-layer MLP with torch's default initialization."""
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def find_off_centre_rows(
    report: initrules.Report, max_ratio: float = MAX_MEAN_TO_STD
) -> list[initrules.Row]:
    """Return the rows whose |mean| is more than ``max_ratio`` times their std.

    Rows with a std of 0 are constant fills (zeros, ones, constant), which are
    usually deliberate, so they are never listed. Rows without statistics
    (empty, boolean or complex tensors) are not listed either. A deliberate
    off-centre draw, such as a norm scale drawn from normal(mean=1, std=0.02),
    is listed, so read the list as tensors to check, not as certain mistakes.
    """
    suspicious = []
    for row in report.rows:
        if row.mean is None or row.std is None or row.std == 0:
            continue
        if abs(row.mean) > max_ratio * row.std:
            suspicious.append(row)
    return suspicious


def main() -> None:
    model = build_model()
    report = initrules.apply(model, POLICY, seed=0)
    print(report)
    print()

    suspicious = find_off_centre_rows(report)
    if suspicious:
        listing = ", ".join(
            f"{row.name} (mean {row.mean:.4g}, std {row.std:.4g})" for row in suspicious
        )
        print(
            f"WARNING: {len(suspicious)} tensor(s) have |mean| > "
            f"{MAX_MEAN_TO_STD:g} x std, check the policy's mean: {listing}"
        )
    else:
        print("No tensor has a mean far from zero compared with its std.")


if __name__ == "__main__":
    main()
