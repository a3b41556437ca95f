"""Draw a report as a PNG: measured against expected std, and activations by depth.

matplotlib is an optional dependency (``pip install 'initrules[plot]'``). The
figure is built with ``matplotlib.figure.Figure`` directly, so plotting never
selects a backend or touches pyplot's global state.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from initrules.report import Report

__all__ = ["plot_report"]

_FAILED_COLOR = "#d62728"
_PASSED_COLOR = "#1f77b4"


def plot_report(report: Report, path: str | os.PathLike[str]) -> None:
    """Write a PNG of the report to ``path``.

    The first panel plots each tensor's measured std against the std its
    scheme implies, on log scales, with tensors that failed a check in red.
    When a probe ran, a second panel plots the output std of every leaf
    module in execution order.

    Raises:
        ImportError: matplotlib is not installed; the message names the extra.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "Report.plot needs matplotlib, which is not installed; install it "
            "with: pip install 'initrules[plot]'"
        ) from None

    panels = 2 if report.probe is not None else 1
    figure = Figure(figsize=(7 * panels, 5.5), layout="constrained")
    axes = figure.subplots(1, panels, squeeze=False)[0]
    _plot_std(report, axes[0])
    if report.probe is not None:
        _plot_activations(report, axes[1])
    figure.suptitle(f"initrules: {report.policy_name}")
    figure.savefig(os.fspath(path), format="png", dpi=100)


def _plot_std(report: Report, ax: Axes) -> None:
    failed = {failure.tensor for failure in report.failures}
    points = [
        (row.expected_std, row.std, row.name in failed)
        for row in report.rows
        if row.std is not None
        and row.expected_std is not None
        and row.std > 0
        and row.expected_std > 0
    ]
    if points:
        low = min(min(x, y) for x, y, _ in points) / 1.5
        high = max(max(x, y) for x, y, _ in points) * 1.5
        ax.plot(
            [low, high],
            [low, high],
            color="0.6",
            linewidth=1,
            label="measured = expected",
        )
        for is_failed, color, label in (
            (False, _PASSED_COLOR, "passed"),
            (True, _FAILED_COLOR, "failed a check"),
        ):
            chosen = [(x, y) for x, y, bad in points if bad == is_failed]
            if chosen:
                ax.scatter(
                    [x for x, _ in chosen],
                    [y for _, y in chosen],
                    s=18,
                    color=color,
                    label=label,
                )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.legend(loc="upper left")
    else:
        ax.text(0.5, 0.5, "no tensor with a known expected std", ha="center")
    ax.set_xlabel("expected std (from the rule's arguments)")
    ax.set_ylabel("measured std")
    ax.set_title(f"{len(points)} tensors")


def _plot_activations(report: Report, ax: Axes) -> None:
    assert report.probe is not None
    records = [r for r in report.probe.records if r.std is not None]
    finite = [(r.index, r.std) for r in records if r.finite and r.std and r.std > 0]
    if finite:
        ax.plot(
            [index for index, _ in finite],
            [std for _, std in finite],
            marker=".",
            linewidth=1,
            color=_PASSED_COLOR,
        )
        ax.set_yscale("log")
    first = report.probe.first_nonfinite
    if first is not None:
        index = next(r.index for r in report.probe.records if r.name == first)
        ax.axvline(index, color=_FAILED_COLOR, label=f"first NaN or Inf: {first}")
        ax.legend(loc="upper left")
    ax.set_xlabel("leaf module call, in execution order")
    ax.set_ylabel("output std")
    ax.set_title("forward-pass probe")
