"""Exceptions and warnings raised by initrules.

Every exception derives from :class:`InitRulesError`::

    InitRulesError
    ├── PolicyError            a policy file or text is invalid (has a position)
    ├── PlanError              a rule cannot apply to a tensor of the model
    │   └── UnmatchedTensorsError   parameters that no rule matched
    ├── ApplyError             writing, or a forward pass after it, failed
    └── CheckError             checks of the initialized tensors failed

Nothing is written to a model when ``apply`` raises a PolicyError or a
PlanError. An ApplyError states how many tensors were written before it. A
CheckError carries the report; it is raised before writing when the rules'
arguments alone fail a check, and after writing otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from initrules.report import Report

__all__ = [
    "ApplyError",
    "CheckError",
    "InitRulesError",
    "InitRulesWarning",
    "PlanError",
    "PolicyError",
    "SourceLocation",
    "UnmatchedTensorsError",
]


@dataclass(frozen=True)
class SourceLocation:
    """Position of a node in a policy file; line and column are 1-based."""

    path: str
    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}:{self.column}"


class InitRulesError(Exception):
    """Base class of every error raised by initrules."""


class InitRulesWarning(UserWarning):
    """Warning category of initrules (for example, unmatched tensors under ``warn``)."""


class PolicyError(InitRulesError):
    """A policy is invalid: bad YAML, an unknown key, a bad value or pattern.

    Attributes:
        path: The policy file, or ``"<text>"`` for a policy given as text.
        line: 1-based line of the offending node, or ``None`` if unknown.
        column: 1-based column of the offending node, or ``None`` if unknown.
        reason: The message without the position prefix.
    """

    def __init__(
        self,
        reason: str,
        *,
        path: str = "<text>",
        line: int | None = None,
        column: int | None = None,
    ) -> None:
        self.path = path
        self.line = line
        self.column = column
        self.reason = reason
        super().__init__(f"{self._prefix()}: {reason}")

    @classmethod
    def at(
        cls, location: SourceLocation | None, reason: str, *, path: str = "<text>"
    ) -> PolicyError:
        """Build an error at ``location``, or at ``path`` with no position."""
        if location is None:
            return cls(reason, path=path)
        return cls(
            reason, path=location.path, line=location.line, column=location.column
        )

    def _prefix(self) -> str:
        if self.line is None:
            return self.path
        return f"{self.path}:{self.line}:{self.column}"


class PlanError(InitRulesError):
    """A rule cannot apply to a tensor, or the model cannot be planned at all."""


class ApplyError(InitRulesError):
    """Writing failed, or a forward pass on data or probe inputs after it.

    The message states what was already written.
    """


class UnmatchedTensorsError(PlanError):
    """Parameters that no rule matched, under ``on_unmatched: error``.

    Attributes:
        names: Canonical names of the unmatched tensors, in module order.
    """

    def __init__(
        self, names: Sequence[str], policy_path: str, *, fix: str | None = None
    ) -> None:
        self.names = list(names)
        shown = "\n".join(f"  {name}" for name in self.names[:50])
        more = len(self.names) - 50
        if more > 0:
            shown += f"\n  ... and {more} more"
        if fix is None:
            fix = (
                "Add a rule that matches them, or set 'on_unmatched: warn' or "
                "'on_unmatched: keep' to leave them as they are."
            )
        super().__init__(
            f"{len(self.names)} parameter(s) matched no rule of {policy_path}:\n"
            f"{shown}\n{fix}"
        )


class CheckError(InitRulesError):
    """Checks of the initialized tensors failed.

    Attributes:
        report: The report of the run, with every failure in
            ``report.failures``. When the rules' arguments alone failed a
            check, nothing was written and ``report.rows`` is empty.
    """

    def __init__(self, report: Report) -> None:
        self.report = report
        failures = report.failures
        shown = "\n".join(f"  {failure.message}" for failure in failures[:20])
        if len(failures) > 20:
            shown += f"\n  ... and {len(failures) - 20} more"
        written = (
            "nothing was written" if not report.rows else "the tensors are written"
        )
        super().__init__(
            f"{len(failures)} check(s) failed for policy {report.policy_path} "
            f"({written}):\n{shown}"
        )
