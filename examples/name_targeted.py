"""Initialize a flat model with rules that select tensors by name.

The policy in ``name_targeted.yaml`` shows the ways a rule can name its
tensors: a glob with ``*`` (``embed.*``), a glob with alternatives
(``{gate,proj_in,proj_out}.bias``), a ``regex`` rule with a named group, a
``param`` predicate on the local attribute name, and a final catch-all rule.
The script prints the report, one row of it in full, and the regex's captured
group for each tensor that the regex rule matched.

Run it from the repository root:

    python examples/name_targeted.py
"""

from pathlib import Path

import torch
from torch import nn

import initrules

POLICY = Path(__file__).parent / "name_targeted.yaml"

VOCAB_SIZE = 100
MODEL_DIM = 16
HIDDEN_DIM = 64


class GatedMLP(nn.Module):
    """Token embedding, a gated MLP block with a residual connection, LayerNorm.

    Every submodule is a direct attribute, so each parameter is named
    ``<attribute>.<weight|bias>``, for example ``proj_in.weight``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB_SIZE, MODEL_DIM)
        self.proj_in = nn.Linear(MODEL_DIM, HIDDEN_DIM)
        self.gate = nn.Linear(MODEL_DIM, HIDDEN_DIM)
        self.proj_out = nn.Linear(HIDDEN_DIM, MODEL_DIM)
        self.norm = nn.LayerNorm(MODEL_DIM)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(tokens)
        gated = self.proj_in(hidden) * torch.sigmoid(self.gate(hidden))
        return self.norm(hidden + self.proj_out(gated))


def build_model() -> GatedMLP:
    """Build the example model with torch's default initialization."""
    return GatedMLP()


def main() -> None:
    model = build_model()
    report = initrules.apply(model, POLICY, seed=0)
    print(report)
    print()

    # One tensor's row: which rule won, where that rule is in the YAML file, the
    # resolved scheme arguments (defaults included) and the statistics after init.
    row = report.row("proj_in.weight")
    print("report.row('proj_in.weight'):")
    print(f"  rule:     {row.rule_name}, rule_index {row.rule_index}")
    print(f"  location: {row.rule_location}")
    print(f"  scheme:   {row.init_text}")
    print(f"  shape:    {row.shape}, {row.dtype}")
    print(f"  mean/std: {row.mean:.4g} / {row.std:.4g}")
    print()

    # The report does not record regex captures. make_plan resolves the same rules
    # without writing anything, and each planned tensor's match keeps them.
    plan = initrules.make_plan(model, initrules.load_policy(POLICY))
    for item in plan.planned:
        if item.match.captures:
            print(f"{item.entry.name}: captured {dict(item.match.captures)}")


if __name__ == "__main__":
    main()
