"""Lint policies: findings with stable codes and positions, with or without a model.

File findings need only the policy: invalid YAML or schema, rules that can
never win, duplicate rules, arguments that are accepted but mislead. Model
findings plan the policy against a model, which may live on the meta device
so that no memory is spent on weights. They report unmatched tensors, dead
and shadowed rules, schemes that cannot fill the tensors they win, and tied
tensors whose names disagree. Every code is documented in ``docs/rules.md``.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import regex
from torch import nn

from initrules.errors import PolicyError, SourceLocation
from initrules.loader import load_policy
from initrules.matcher import Matcher
from initrules.planner import Plan, make_plan
from initrules.report import format_shape
from initrules.schema import Match, Policy, Rule
from initrules.schemes import KaimingArgs, SchemeArgs, TruncNormalArgs

__all__ = ["CODES", "Finding", "LintCode", "lint_path", "lint_policy", "sort_findings"]

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class LintCode:
    """A lint code: its stable identifier, kebab-case name and severity."""

    code: str
    name: str
    severity: Severity
    summary: str


_ALL_CODES = [
    LintCode("IR001", "invalid-policy", "error", "The file is not a valid policy."),
    LintCode(
        "IR002",
        "suppression-without-reason",
        "error",
        "A lint_ignore entry gives no reason.",
    ),
    LintCode(
        "IR003",
        "unknown-lint-code",
        "error",
        "A lint_ignore entry names no known code.",
    ),
    LintCode(
        "IR101", "unreachable-rule", "error", "A rule comes after a catch-all rule."
    ),
    LintCode(
        "IR102", "duplicate-match", "error", "Two rules have identical predicates."
    ),
    LintCode(
        "IR103", "regex-matches-empty", "warning", "A regex matches the empty name."
    ),
    LintCode(
        "IR104",
        "kaiming-a-ignored",
        "warning",
        "Kaiming's `a` is set but the nonlinearity is not leaky_relu.",
    ),
    LintCode(
        "IR105",
        "trunc-normal-bounds",
        "warning",
        "trunc_normal bounds cut most of the distribution, or none of it.",
    ),
    LintCode(
        "IR106",
        "unknown-module-class",
        "error",
        "A qualified module class cannot be imported.",
    ),
    LintCode("IR201", "unmatched-tensor", "error", "A parameter matches no rule."),
    LintCode("IR202", "dead-rule", "warning", "A rule matches no tensor of the model."),
    LintCode(
        "IR203",
        "shadowed-rule",
        "warning",
        "Every tensor a rule matches is won by earlier rules.",
    ),
    LintCode(
        "IR204",
        "scheme-cannot-apply",
        "error",
        "A rule's scheme cannot fill a tensor the rule wins.",
    ),
    LintCode(
        "IR205",
        "tied-rule-conflict",
        "warning",
        "The names of a tied tensor would win different rules.",
    ),
]
CODES: dict[str, LintCode] = {code.code: code for code in _ALL_CODES}

# trunc_normal bounds closer to the mean than this many standard deviations
# cut most of the distribution away.
_TRUNCATION_TOO_TIGHT = 1.0
# Bounds farther than this many standard deviations cut (almost) nothing:
# the probability of a draw beyond 6 std is about 2e-9.
_TRUNCATION_TOO_LOOSE = 6.0


@dataclass(frozen=True)
class Finding:
    """One lint finding; :func:`sort_findings` orders them by file, line, column, code.

    Attributes:
        path: The policy file.
        line: 1-based line.
        column: 1-based column.
        code: The stable code (``IR101``).
        message: What is wrong and how to fix it.
        rule_index: 0-based index of the rule it concerns, if any.
    """

    path: str
    line: int
    column: int
    code: str
    message: str
    rule_index: int | None = None

    @property
    def sort_key(self) -> tuple[str, int, int, str]:
        """The stable order of findings: file, line, column, code."""
        return (self.path, self.line, self.column, self.code)

    @property
    def name(self) -> str:
        """The kebab-case name of the code."""
        return CODES[self.code].name

    @property
    def severity(self) -> Severity:
        """``error`` or ``warning``."""
        return CODES[self.code].severity

    def __str__(self) -> str:
        return f"{self.path}:{self.line}:{self.column}: {self.code} {self.message}"


def lint_path(
    path: str | os.PathLike[str], *, model: nn.Module | None = None
) -> list[Finding]:
    """Lint one policy file, and check it against ``model`` when given.

    Returns:
        Findings in a stable order (file, line, column, code), suppressions
        already applied.

    Raises:
        PolicyError: Only when the file cannot be read (a missing file, bad
            encoding); invalid content becomes an ``IR001`` finding.
    """
    source = os.fspath(path)
    try:
        policy = load_policy(source)
    except PolicyError as error:
        if error.line is None:
            raise
        return [Finding(source, error.line, error.column or 1, "IR001", error.reason)]
    return lint_policy(policy, model=model)


def lint_policy(policy: Policy, *, model: nn.Module | None = None) -> list[Finding]:
    """Lint a loaded policy, and check it against ``model`` when given.

    The model may be on the meta device. Findings come sorted, with
    ``lint_ignore`` suppressions applied.
    """
    findings = _file_findings(policy)
    if model is not None:
        findings += _model_findings(policy, model)
    return sort_findings(_apply_suppressions(policy, findings))


def sort_findings(findings: Iterable[Finding]) -> list[Finding]:
    """Sort by file, line, column and code; ties keep their order (module order)."""
    return sorted(findings, key=lambda finding: finding.sort_key)


# --- file findings -----------------------------------------------------------


def _position(policy: Policy, index: int | None) -> SourceLocation:
    if index is not None:
        location = policy.rules[index].location
        if location is not None:
            return location
    return SourceLocation(policy.path, 1, 1)


def _finding(policy: Policy, index: int | None, code: str, message: str) -> Finding:
    where = _position(policy, index)
    return Finding(where.path, where.line, where.column, code, message, index)


# Predicate values that hold for every tensor.
_MATCH_ANY = {"name": "**", "param": "*", "regex": ".*"}


def _is_catch_all(match: Match) -> bool:
    predicates = match.model_dump(
        exclude={"kind", "exact", "chunk_dim"}, exclude_none=True
    )
    return all(_MATCH_ANY.get(key) == value for key, value in predicates.items())


def _unreachable(policy: Policy) -> dict[int, int]:
    """Map each rule after a catch-all of its kind to that catch-all's index."""
    catch_all: dict[str, int] = {}
    unreachable: dict[int, int] = {}
    for index, rule in enumerate(policy.rules):
        kind = rule.match.kind
        if kind in catch_all:
            unreachable[index] = catch_all[kind]
        elif _is_catch_all(rule.match):
            catch_all[kind] = index
    return unreachable


def _match_key(match: Match) -> str:
    # Lists are sets of alternatives, so their order does not matter.
    dump = {
        key: sorted(value, key=str) if isinstance(value, list) else value
        for key, value in match.model_dump().items()
    }
    return json.dumps(dump, sort_keys=True)


def _file_findings(policy: Policy) -> list[Finding]:
    findings: list[Finding] = []
    unreachable = _unreachable(policy)
    seen: dict[str, int] = {}
    for index, rule in enumerate(policy.rules):
        label = rule.label(index, with_location=False)
        if index in unreachable:
            earlier = unreachable[index]
            findings.append(
                _finding(
                    policy,
                    index,
                    "IR101",
                    f"{label} can never win: {policy.rules[earlier].label(earlier)} "
                    f"matches every {rule.match.kind} first; move this rule above "
                    "it or delete it",
                )
            )
        key = _match_key(rule.match)
        if key in seen:
            findings.append(
                _finding(
                    policy,
                    index,
                    "IR102",
                    f"{label} has the same match as "
                    f"{policy.rules[seen[key]].label(seen[key])}, so it never wins; "
                    "delete it or change its predicates",
                )
            )
        else:
            seen[key] = index
        findings += _rule_findings(policy, index, rule)
    return findings


def _rule_findings(policy: Policy, index: int, rule: Rule) -> list[Finding]:
    findings: list[Finding] = []
    label = rule.label(index, with_location=False)
    pattern = rule.match.regex
    matches_empty = (
        pattern is not None
        and pattern != _MATCH_ANY["regex"]
        and regex.fullmatch(pattern, "", timeout=1.0) is not None
    )
    if matches_empty:
        findings.append(
            _finding(
                policy,
                index,
                "IR103",
                f"the regex {pattern!r} of {label} matches the empty name; "
                "use '+' instead of '*' where a segment must be present",
            )
        )
    # Arguments given as expressions are known only per tensor; linting
    # against a model judges them there (see _model_findings).
    if not rule.init.expressions.keys() & _JUDGED_ARGUMENTS:
        findings += _argument_findings(policy, index, label, rule.init.args)
    for spec in [*(rule.match.module or []), *(rule.match.within or [])]:
        problem = _class_problem(spec) if "." in spec else None
        if problem is not None:
            findings.append(
                _finding(
                    policy,
                    index,
                    "IR106",
                    f"{label} names the class {spec!r}, which {problem}; check the "
                    "module path, or use the bare class name",
                )
            )
    return findings


# Arguments that IR104 and IR105 judge.
_JUDGED_ARGUMENTS = frozenset({"a", "b", "mean", "std"})


def _argument_findings(
    policy: Policy, index: int, label: str, args: SchemeArgs
) -> list[Finding]:
    """Return IR104 and IR105 findings on one set of a rule's arguments."""
    findings = []
    if (
        isinstance(args, KaimingArgs)
        and args.a != 0
        and args.nonlinearity != "leaky_relu"
    ):
        findings.append(
            _finding(
                policy,
                index,
                "IR104",
                f"{label} sets a={args.a} but nonlinearity={args.nonlinearity!r}, "
                "which ignores it; use nonlinearity: leaky_relu or drop 'a'",
            )
        )
    if isinstance(args, TruncNormalArgs) and args.std > 0:
        findings += _truncation_findings(policy, index, label, args)
    return findings


def _evaluated_argument_findings(policy: Policy, plan: Plan) -> list[Finding]:
    """Judge the arguments that expressions give, tensor by tensor.

    A rule gets at most one finding per code: the first tensor's.
    """
    found: dict[tuple[int, str], Finding] = {}
    for item in plan.planned:
        rule = item.match.rule
        if not rule.init.expressions.keys() & _JUDGED_ARGUMENTS:
            continue
        index = item.match.rule_index
        label = f"{rule.label(index, with_location=False)} on {item.label!r}"
        for finding in _argument_findings(policy, index, label, item.args):
            found.setdefault((index, finding.code), finding)
    return list(found.values())


def _truncation_findings(
    policy: Policy, index: int, label: str, args: TruncNormalArgs
) -> list[Finding]:
    nearest = min(args.b - args.mean, args.mean - args.a) / args.std
    farthest = max(args.b - args.mean, args.mean - args.a) / args.std
    if nearest < 0:
        detail = "the mean lies outside [a, b], so every draw comes from one tail"
    elif nearest < _TRUNCATION_TOO_TIGHT:
        detail = f"a bound lies {nearest:.3g} std from the mean, cutting most draws"
    elif farthest > _TRUNCATION_TOO_LOOSE and nearest > _TRUNCATION_TOO_LOOSE:
        detail = (
            f"the bounds lie {nearest:.3g} std or more from the mean, so nothing "
            "is truncated"
        )
    else:
        return []
    suggestion = f"a: {args.mean - 2 * args.std:.6g}, b: {args.mean + 2 * args.std:.6g}"
    return [
        _finding(
            policy,
            index,
            "IR105",
            f"{label} uses trunc_normal with std={args.std}, a={args.a}, b={args.b}: "
            f"{detail}; a and b are absolute values, not multiples of std (for two "
            f"std, write {suggestion})",
        )
    ]


def _class_problem(qualified: str) -> str | None:
    """Return why ``pkg.module.Class`` does not name a class, or ``None``.

    Only packages that are already imported (torch, and the model's library
    when linting with --model) are imported further, so a policy cannot make
    lint run the code of an arbitrary installed module. For a package that is
    installed but not imported, the class is not checked.
    """
    parts = qualified.split(".")
    if parts[0] not in sys.modules:
        return (
            "cannot be imported" if importlib.util.find_spec(parts[0]) is None else None
        )
    for split in range(len(parts) - 1, 0, -1):
        try:
            value: object = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attribute in parts[split:]:
            value = getattr(value, attribute, None)
            if value is None:
                return "cannot be imported"
        return None if isinstance(value, type) else "is not a class"
    return "cannot be imported"


# --- model findings ----------------------------------------------------------


def _model_findings(policy: Policy, model: nn.Module) -> list[Finding]:
    try:
        plan = make_plan(
            model, policy, all_matches=True, allow_meta=True, raise_problems=False
        )
    except PolicyError as error:
        # A regex that timed out on one of the model's names.
        return [
            Finding(
                error.path, error.line or 1, error.column or 1, "IR001", error.reason
            )
        ]
    findings = [
        _finding(
            policy,
            None,
            "IR201",
            f"parameter {entry.name!r} ({type(entry.module).__name__}, shape "
            f"{format_shape(entry.tensor.shape)}) matches no rule; add a rule for it",
        )
        for entry in plan.unmatched
        # `on_unmatched: keep` states that leaving them is deliberate.
        if policy.on_unmatched != "keep"
    ]
    tied = _tied_findings(policy, plan)
    # A rule that matches only the second name of a tied tensor does match a
    # tensor, so IR205 explains it and IR202 ("matches no tensor") would not.
    alias_rules = {finding.rule_index for finding in tied}
    findings += [
        finding
        for finding in _rule_usage_findings(policy, plan)
        if finding.code not in ("IR202", "IR205")
        or finding.rule_index not in alias_rules
    ]
    findings += _evaluated_argument_findings(policy, plan)
    for problem in plan.problems:
        index = problem.match.rule_index
        label = problem.match.rule.label(index, with_location=False)
        findings.append(_finding(policy, index, "IR204", f"{label} {problem.detail}"))
    findings += tied
    return findings


def _alias_matches(policy: Policy, plan: Plan) -> dict[int, tuple[str, str]]:
    """Map rules that match a tied tensor's later name to (that name, first name)."""
    matcher = Matcher(policy)
    entries = [item.entry for item in plan.planned]
    entries += [problem.entry for problem in plan.problems]
    entries += [item.entry for item in plan.skipped] + plan.unmatched
    found: dict[int, tuple[str, str]] = {}
    for entry in entries:
        for alias in entry.alias_infos:
            result = matcher.match(alias, all_matches=True)
            if result is None:
                continue
            for index in (result.rule_index, *result.also_matched):
                found.setdefault(index, (alias.name, entry.name))
    return found


def _rule_usage_findings(policy: Policy, plan: Plan) -> list[Finding]:
    won: Counter[int] = Counter()
    also: Counter[int] = Counter()
    winners_of: dict[int, Counter[int]] = {}
    matches = [item.match for item in plan.planned]
    matches += [problem.match for problem in plan.problems]
    matches += [item.match for item in plan.skipped if item.match is not None]
    for match in matches:
        won[match.rule_index] += 1
        for later in match.also_matched:
            also[later] += 1
            winners_of.setdefault(later, Counter())[match.rule_index] += 1

    findings: list[Finding] = []
    unreachable = _unreachable(policy)
    alias_matches = _alias_matches(policy, plan)
    for index, rule in enumerate(policy.rules):
        # IR101 already reports rules after a catch-all, and a final catch-all
        # that wins nothing is a safety net, not a mistake.
        if won[index] or index in unreachable or _is_catch_all(rule.match):
            continue
        label = rule.label(index, with_location=False)
        if not also[index] and index in alias_matches:
            alias, first = alias_matches[index]
            findings.append(
                _finding(
                    policy,
                    index,
                    "IR205",
                    f"{label} matches only {alias!r}, a tied name of {first!r}; a "
                    "tied tensor is initialized by the rule for its first name, so "
                    f"match {first!r} instead",
                )
            )
            continue
        if not also[index]:
            findings.append(
                _finding(
                    policy,
                    index,
                    "IR202",
                    f"{label} matches no tensor of the model; fix its predicates "
                    "or delete it",
                )
            )
            continue
        winners = ", ".join(
            f"{policy.rules[winner].label(winner, with_location=False)} "
            f"({count} tensor{'s' if count > 1 else ''})"
            for winner, count in sorted(winners_of[index].items())
        )
        findings.append(
            _finding(
                policy,
                index,
                "IR203",
                f"{label} matches {also[index]} tensor(s), all won by earlier rules: "
                f"{winners}; move it up, narrow the earlier rules, or delete it",
            )
        )
    return findings


def _tied_findings(policy: Policy, plan: Plan) -> list[Finding]:
    matcher = Matcher(policy)
    findings: list[Finding] = []
    for item in plan.planned:
        entry = item.entry
        for alias in entry.alias_infos:
            result = matcher.match(alias)
            if result is None or result.rule_index == item.match.rule_index:
                continue
            winner = policy.rules[item.match.rule_index]
            alias_rule = result.rule.label(result.rule_index, with_location=False)
            findings.append(
                _finding(
                    policy,
                    result.rule_index,
                    "IR205",
                    f"{alias.name!r} is tied to {entry.name!r}, which "
                    f"{winner.label(item.match.rule_index, with_location=False)} "
                    f"initializes; {alias_rule} "
                    f"would win {alias.name!r} but is not used for it",
                )
            )
    return findings


# --- suppressions --------------------------------------------------------------


def _apply_suppressions(policy: Policy, findings: list[Finding]) -> list[Finding]:
    kept: list[Finding] = []
    file_wide = policy.lint_ignore
    for finding in findings:
        if finding.code in file_wide:
            continue
        index = finding.rule_index
        if index is not None and finding.code in policy.rules[index].lint_ignore:
            continue
        kept.append(finding)
    kept += _suppression_findings(policy, None, file_wide)
    for index, rule in enumerate(policy.rules):
        kept += _suppression_findings(policy, index, rule.lint_ignore)
    return kept


def _suppression_findings(
    policy: Policy, index: int | None, ignored: dict[str, str | None]
) -> list[Finding]:
    where = (
        "the file"
        if index is None
        else policy.rules[index].label(index, with_location=False)
    )
    findings: list[Finding] = []
    for code, reason in ignored.items():
        if code not in CODES:
            findings.append(
                _finding(
                    policy,
                    index,
                    "IR003",
                    f"lint_ignore of {where} names {code!r}, which is not a lint "
                    f"code; valid codes: {', '.join(CODES)}",
                )
            )
        elif not (reason or "").strip():
            findings.append(
                _finding(
                    policy,
                    index,
                    "IR002",
                    f"lint_ignore of {where} silences {code} without a reason; "
                    f"write why, as in 'lint_ignore: {{{code}: <reason>}}'",
                )
            )
    return findings
