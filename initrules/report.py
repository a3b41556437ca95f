"""The record of one ``apply`` run: a row per tensor, unmatched and skipped lists."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Report", "Row", "Skipped", "format_shape"]


@dataclass(frozen=True)
class Row:
    """One initialized (or deliberately kept) tensor.

    Attributes:
        name: Canonical name.
        aliases: Other names of the same tensor (tied weights).
        shape: Shape of the tensor.
        dtype: Dtype name (``float32``).
        module_type: Class name of the owning module.
        kind: ``parameter`` or ``buffer``.
        rule_index: 0-based position of the winning rule.
        rule_name: The winning rule's name, if it has one.
        rule_location: ``file:line:column`` of the winning rule, if known.
        scheme: Scheme name.
        args: Resolved scheme arguments, defaults included.
        captures: Named groups captured by the winning rule's regex.
        mean: Mean of the values after init.
        std: Standard deviation after init (0 for a single element).
        min: Smallest value after init.
        max: Largest value after init.
        expected_mean: The mean the scheme's arguments imply, if known.
        expected_std: The standard deviation they imply, if known.
        note: Extra detail, for example a zeroed padding row.
    """

    name: str
    aliases: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str
    module_type: str
    kind: str
    rule_index: int
    rule_name: str | None
    rule_location: str | None
    scheme: str
    args: dict[str, Any]
    captures: dict[str, str]
    mean: float | None
    std: float | None
    min: float | None
    max: float | None
    expected_mean: float | None = None
    expected_std: float | None = None
    note: str = ""

    @property
    def numel(self) -> int:
        """Number of elements."""
        count = 1
        for size in self.shape:
            count *= size
        return count


@dataclass(frozen=True)
class Skipped:
    """A matched tensor that was not written, with the reason."""

    name: str
    reason: str


@dataclass
class Report:
    """Record of one ``apply`` run on a model.

    Attributes:
        policy_name: The policy's ``name``, or its path when it has none.
        policy_path: The policy file, or ``"<text>"``.
        seed: The seed of the run, or ``None`` for torch's global generator.
        rows: One row per distinct tensor written or kept, in module order.
        unmatched: Canonical names of parameters no rule matched.
        skipped: Matched tensors not written (zero elements).
        untouched_buffers: Canonical names of buffers no rule targets.
    """

    policy_name: str
    policy_path: str
    seed: int | None
    rows: list[Row] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    untouched_buffers: list[str] = field(default_factory=list)

    def row(self, name: str) -> Row:
        """Return the row of a tensor by its canonical name or one of its aliases.

        Raises:
            KeyError: No row has that name.
        """
        for row in self.rows:
            if row.name == name or name in row.aliases:
                return row
        raise KeyError(f"no tensor named {name!r} in the report")

    @property
    def summary(self) -> dict[str, int]:
        """Counts: tensors and elements initialized, kept, unmatched, skipped."""
        written = [row for row in self.rows if row.scheme != "keep"]
        return {
            "initialized": len(written),
            "elements": sum(row.numel for row in written),
            "kept": len(self.rows) - len(written),
            "unmatched": len(self.unmatched),
            "skipped": len(self.skipped),
            "untouched_buffers": len(self.untouched_buffers),
        }

    def to_dict(self) -> dict[str, Any]:
        """Return the report as JSON-serializable data.

        Non-finite statistics (a kept tensor holding NaN) become the strings
        ``"nan"``, ``"inf"`` and ``"-inf"``, since strict JSON has no such numbers.
        """
        data = asdict(self)
        for row in data["rows"]:
            row["shape"] = list(row["shape"])
            row["aliases"] = list(row["aliases"])
            for key in ("mean", "std", "min", "max"):
                value = row[key]
                if value is not None and not math.isfinite(value):
                    row[key] = str(value)
        data["summary"] = self.summary
        return data

    def __str__(self) -> str:
        return _format_report(self)


def format_shape(shape: Sequence[int]) -> str:
    """Return a shape as ``64x128`` (``scalar`` for a 0-d tensor)."""
    return "x".join(map(str, shape)) or "scalar"


def _format_number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _format_args(args: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value}" for key, value in args.items())


def _policy_text(report: Report) -> str:
    if report.policy_name == report.policy_path:
        return report.policy_path
    return f"{report.policy_name} ({report.policy_path})"


def _format_report(report: Report) -> str:
    header = (
        "tensor",
        "shape",
        "module",
        "rule",
        "scheme",
        "mean",
        "std",
        "expected std",
        "min",
        "max",
    )
    lines: list[tuple[str, ...]] = [header]
    for row in report.rows:
        rule = row.rule_name or f"#{row.rule_index + 1}"
        if row.rule_location:
            line = row.rule_location.rsplit(":", 2)[-2]
            rule = f"{rule} (line {line})"
        scheme = row.scheme + (f"({_format_args(row.args)})" if row.args else "")
        name = row.name + (f" (= {', '.join(row.aliases)})" if row.aliases else "")
        lines.append(
            (
                name,
                format_shape(row.shape),
                row.module_type,
                rule,
                scheme,
                _format_number(row.mean),
                _format_number(row.std),
                _format_number(row.expected_std),
                _format_number(row.min),
                _format_number(row.max),
            )
        )
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    table = [
        "  ".join(
            cell.ljust(width) for cell, width in zip(line, widths, strict=True)
        ).rstrip()
        for line in lines
    ]
    counts = report.summary
    parts = [
        f"initrules: policy {_policy_text(report)}, seed {report.seed}",
        *table,
        (
            f"{counts['initialized']} tensors initialized "
            f"({counts['elements']:,} elements), {counts['kept']} kept, "
            f"{counts['unmatched']} unmatched, {counts['skipped']} skipped, "
            f"{counts['untouched_buffers']} buffers untouched"
        ),
    ]
    if report.unmatched:
        parts.append("unmatched: " + ", ".join(report.unmatched))
    for skipped in report.skipped:
        parts.append(f"skipped: {skipped.name} ({skipped.reason})")
    return "\n".join(parts)
