"""The record of one ``apply`` run: a row per tensor, check failures, lists."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from initrules.errors import CheckError

if TYPE_CHECKING:
    from initrules.probing import ProbeReport

__all__ = [
    "CheckFailure",
    "LsuvResult",
    "Report",
    "Row",
    "Skipped",
    "format_args",
    "format_shape",
    "json_number",
]


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
        chunk: ``(index, count, dim)`` when the row is one block of a tensor
            that a rule split into chunks; ``shape`` is then the block's.
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
    chunk: tuple[int, int, int] | None = None

    @property
    def init_text(self) -> str:
        """The scheme with its arguments, as the report prints it."""
        return self.scheme + (f"({format_args(self.args)})" if self.args else "")

    @property
    def label(self) -> str:
        """The name, with the block for one chunk of a tensor."""
        if self.chunk is None:
            return self.name
        index, count, dim = self.chunk
        return f"{self.name}[chunk {index} of {count}, dim {dim}]"

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


@dataclass(frozen=True)
class CheckFailure:
    """One failed check of one tensor (or, for the probe, one module).

    Attributes:
        check: The check's name: ``finite``, ``statistics``, ``scale``,
            ``bounds``, ``ties``, ``expect`` or ``probe``.
        tensor: Canonical name of the tensor, or of the module for ``probe``.
        message: One sentence with the measured and expected values.
        measured: The measured value; for checks made before writing, the
            value the rule's arguments imply.
        expected: The value the check expected, if there is a single one.
        allowed: The accepted ``(low, high)`` range, if the check has one.
        rule: The winning rule's label with its position, if any.
    """

    check: str
    tensor: str
    message: str
    measured: float | None = None
    expected: float | None = None
    allowed: tuple[float, float] | None = None
    rule: str | None = None


@dataclass(frozen=True)
class LsuvResult:
    """The data-dependent pass of one ``lsuv`` tensor.

    Attributes:
        name: Canonical name of the weight.
        module: Canonical name of the module whose output was measured.
        iterations: Forward passes made for this weight.
        output_std: Standard deviation of the module's output after the last
            rescaling.
        converged: True if the output std ended within ``tol`` of the target.
        reason: Why it did not converge: ``no output``, ``not finite``,
            ``stalled`` (rescaling stopped moving the std) or ``max_iter``;
            empty when it converged. A weight that did not converge keeps
            its base draw.
    """

    name: str
    module: str
    iterations: int
    output_std: float
    converged: bool
    reason: str = ""


@dataclass
class Report:
    """Record of one ``apply`` run on a model.

    Attributes:
        policy_name: The policy's ``name``, or its path when it has none.
        policy_path: The policy file, or ``"<text>"``.
        seed: The seed of the run, or ``None`` for torch's global generator.
        rows: One row per distinct tensor written or kept, in module order;
            a tensor that a rule split into chunks has one row per block.
        unmatched: Canonical names of parameters no rule matched.
        skipped: Matched tensors not written (zero elements).
        untouched_buffers: Canonical names of buffers no rule targets.
        failures: Checks that failed, in the order they ran.
        probe: The forward-pass probe, when one ran.
        lsuv: The data-dependent pass of each ``lsuv`` tensor, in forward order.
        checked: True if the checks ran (the policy may turn them off).
    """

    policy_name: str
    policy_path: str
    seed: int | None
    rows: list[Row] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    untouched_buffers: list[str] = field(default_factory=list)
    failures: list[CheckFailure] = field(default_factory=list)
    probe: ProbeReport | None = None
    lsuv: list[LsuvResult] = field(default_factory=list)
    checked: bool = False

    @property
    def ok(self) -> bool:
        """True if no check failed."""
        return not self.failures

    def raise_for_failures(self) -> None:
        """Raise a :class:`CheckError` carrying this report if any check failed."""
        if self.failures:
            raise CheckError(self)

    def row(self, name: str) -> Row:
        """Return the row of a tensor by its canonical name or one of its aliases.

        For a tensor split into chunks this is its first block's row; see
        :meth:`rows_of`.

        Raises:
            KeyError: No row has that name.
        """
        for row in self.rows:
            if row.name == name or name in row.aliases:
                return row
        raise KeyError(f"no tensor named {name!r} in the report")

    def rows_of(self, name: str) -> list[Row]:
        """Return every row of a tensor: one, or one per block when it was split.

        Raises:
            KeyError: No row has that name.
        """
        found = [row for row in self.rows if row.name == name or name in row.aliases]
        if not found:
            raise KeyError(f"no tensor named {name!r} in the report")
        return found

    @property
    def summary(self) -> dict[str, int]:
        """Counts: tensors and elements initialized, kept, unmatched, skipped."""
        # A tensor split into chunks has a row per block but counts once.
        written = [row for row in self.rows if row.scheme != "keep"]
        kept = {row.name for row in self.rows if row.scheme == "keep"}
        return {
            "initialized": len({row.name for row in written}),
            "elements": sum(row.numel for row in written),
            "kept": len(kept),
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
        data["probe"] = self.probe.to_dict() if self.probe is not None else None
        for failure in data["failures"]:
            for key in ("measured", "expected"):
                failure[key] = json_number(failure[key])
            if failure["allowed"] is not None:
                failure["allowed"] = [json_number(v) for v in failure["allowed"]]
        for row in data["rows"]:
            row["shape"] = list(row["shape"])
            row["aliases"] = list(row["aliases"])
            for key in ("mean", "std", "min", "max"):
                row[key] = json_number(row[key])
        data["summary"] = self.summary
        return data

    def to_json(self, path: str | os.PathLike[str] | None = None) -> str:
        """Return the report as JSON text, and write it to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path is not None:
            with open(path, "w", encoding="utf-8") as file:
                file.write(text)
        return text

    def to_markdown(self) -> str:
        """Return the report as Markdown: a summary, a table and every failure."""
        return _format_markdown(self)

    def plot(self, path: str | os.PathLike[str]) -> None:
        """Write a PNG of measured against expected std (and the probe, if run).

        Raises:
            ImportError: matplotlib is missing; install ``initrules[plot]``.
        """
        from initrules.plot import plot_report

        plot_report(self, path)

    def __str__(self) -> str:
        return _format_report(self)


def json_number(value: float | None) -> float | str | None:
    """Return a non-finite float as the string strict JSON needs, else the value."""
    if value is not None and not math.isfinite(value):
        return str(value)
    return value


def format_shape(shape: Sequence[int]) -> str:
    """Return a shape as ``64x128`` (``scalar`` for a 0-d tensor)."""
    return "x".join(map(str, shape)) or "scalar"


def _format_number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def format_args(args: Mapping[str, Any]) -> str:
    """Return scheme arguments as ``key=value`` pairs, the fan settings last.

    Unset arguments (``None``) are left out.
    """
    shown = [(key, value) for key, value in args.items() if value is not None]
    shown.sort(key=lambda pair: pair[0] in _FAN_KEYS)
    return ", ".join(f"{key}={value}" for key, value in shown)


_FAN_KEYS = frozenset({"fans", "fan_in", "fan_out"})


def _policy_text(report: Report) -> str:
    if report.policy_name == report.policy_path:
        return report.policy_path
    return f"{report.policy_name} ({report.policy_path})"


def _summary_text(report: Report) -> str:
    counts = report.summary
    return (
        f"{counts['initialized']} tensors initialized "
        f"({counts['elements']:,} elements), {counts['kept']} kept, "
        f"{counts['unmatched']} unmatched, {counts['skipped']} skipped, "
        f"{counts['untouched_buffers']} buffers untouched"
    )


def _rule_text(row: Row, policy_path: str) -> str:
    """Return the rule's name and line, with the file when a base policy has it."""
    rule = row.rule_name or f"#{row.rule_index + 1}"
    if row.rule_location:
        path, line, _ = row.rule_location.rsplit(":", 2)
        where = (
            f"line {line}"
            if path == policy_path
            else f"{os.path.basename(path)}:{line}"
        )
        rule = f"{rule} ({where})"
    return rule


def _markdown_cell(text: str) -> str:
    # A pipe would end the cell and a line break the row.
    return " ".join(text.replace("|", "\\|").splitlines())


def _verdict(report: Report) -> str:
    if report.failures:
        return f"{len(report.failures)} check(s) failed"
    if report.checked:
        return "all checks passed"
    return "checks did not run"


def _format_markdown(report: Report) -> str:
    lines = [
        f"# initrules report: {_markdown_cell(_policy_text(report))}",
        "",
        f"Seed {report.seed}. {_summary_text(report)}; {_verdict(report)}.",
        "",
        "| tensor | shape | module | rule | scheme | mean | std | expected std |",
        "|---|---|---|---|---|---:|---:|---:|",
    ]
    for row in report.rows:
        aliases = "".join(f" (= `{alias}`)" for alias in row.aliases)
        cells = (
            f"`{row.label}`{aliases}",
            format_shape(row.shape),
            row.module_type,
            _rule_text(row, report.policy_path),
            row.init_text,
            _format_number(row.mean),
            _format_number(row.std),
            _format_number(row.expected_std),
        )
        lines.append("| " + " | ".join(_markdown_cell(cell) for cell in cells) + " |")
    sections = [
        ("Failed checks", [failure.message for failure in report.failures]),
        ("Unmatched parameters", [f"`{name}`" for name in report.unmatched]),
        (
            "Skipped",
            [f"`{skipped.name}`: {skipped.reason}" for skipped in report.skipped],
        ),
        (
            "LSUV",
            [
                f"`{result.name}`: output std {result.output_std:.4g} after "
                f"{result.iterations} pass(es)"
                for result in report.lsuv
            ],
        ),
    ]
    if report.probe is not None:
        probe = report.probe
        probe_lines = [f"{len(probe.records)} leaf module calls recorded"]
        probe_lines += [flag.message for flag in probe.flags]
        sections.append(("Forward-pass probe", probe_lines))
    for title, items in sections:
        if items:
            lines += ["", f"## {title}", ""]
            lines += [f"- {_markdown_cell(item)}" for item in items]
    return "\n".join(lines) + "\n"


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
        rule = _rule_text(row, report.policy_path)
        scheme = row.init_text
        name = row.label + (f" (= {', '.join(row.aliases)})" if row.aliases else "")
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
    parts = [
        f"initrules: policy {_policy_text(report)}, seed {report.seed}",
        *table,
        _summary_text(report),
    ]
    if report.unmatched:
        parts.append("unmatched: " + ", ".join(report.unmatched))
    for skipped in report.skipped:
        parts.append(f"skipped: {skipped.name} ({skipped.reason})")
    for result in report.lsuv:
        state = "converged" if result.converged else "did not converge"
        parts.append(
            f"lsuv: {result.name}: output std {result.output_std:.4g} after "
            f"{result.iterations} pass(es), {state}"
        )
    if report.probe is not None:
        parts.append(
            f"probe: {len(report.probe.records)} leaf module calls recorded, "
            f"{len(report.probe.flags)} flagged"
        )
    if report.failures:
        parts.append(f"{_verdict(report)}:")
        parts.extend(f"  {failure.message}" for failure in report.failures)
    else:
        parts.append(_verdict(report))
    return "\n".join(parts)
