"""Compile a policy's rules once and find the winning rule for each tensor."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import regex

from initrules.errors import PolicyError
from initrules.globs import compile_glob
from initrules.schema import Match, Policy, Rule

__all__ = ["REGEX_TIMEOUT_S", "MatchResult", "Matcher", "TensorInfo"]

logger = logging.getLogger(__name__)

# A rule's regex gets this many seconds per tensor name before it is treated
# as runaway (catastrophic backtracking) and rejected.
REGEX_TIMEOUT_S = 0.25


@dataclass(frozen=True)
class TensorInfo:
    """Facts about one tensor that the matcher tests predicates against.

    Attributes:
        name: Canonical dotted name (wrapper segments removed).
        local_name: Attribute name on the owning module (``weight``).
        module_class: Class of the owning module.
        ancestor_classes: Classes of the owning module's ancestors, root first.
        ndim: Number of dimensions.
        dtype: Dtype name without the ``torch.`` prefix (``float32``).
        kind: ``parameter`` or ``buffer``.
    """

    name: str
    local_name: str
    module_class: type
    ancestor_classes: tuple[type, ...]
    ndim: int
    dtype: str
    kind: str = "parameter"


@dataclass(frozen=True)
class MatchResult:
    """The winning rule for one tensor.

    Attributes:
        rule_index: 0-based position of the rule in the policy.
        rule: The rule itself.
        captures: Named groups captured by the rule's regex.
        also_matched: Indices of later rules that also match, when requested.
    """

    rule_index: int
    rule: Rule
    captures: Mapping[str, str] = field(default_factory=dict)
    also_matched: tuple[int, ...] = ()


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _resolve_imported(qualified: str) -> Any:
    """Find ``pkg.mod.Class`` among modules already imported; never import."""
    parts = qualified.split(".")
    for split in range(len(parts) - 1, 0, -1):
        module = sys.modules.get(".".join(parts[:split]))
        if module is None:
            continue
        value: Any = module
        for attribute in parts[split:]:
            value = getattr(value, attribute, None)
            if value is None:
                return None
        return value
    return None


class _ClassPredicate:
    """Test of a module class against class specs, cached per class."""

    def __init__(self, specs: list[str], exact: bool) -> None:
        self.globs = [compile_glob(spec) for spec in specs if "." not in spec]
        self.qualified = [spec for spec in specs if "." in spec]
        for spec in self.qualified:
            if not isinstance(_resolve_imported(spec), type):
                logger.warning(
                    "module class %r is not a class of any imported module, so no "
                    "module can match it; check the path or use the bare class name",
                    spec,
                )
        self.exact = exact
        self.cache: dict[type, bool] = {}

    def __call__(self, cls: type) -> bool:
        hit = self.cache.get(cls)
        if hit is None:
            hit = _class_matches(cls, self.globs, self.qualified, self.exact)
            self.cache[cls] = hit
        return hit


def _class_matches(
    cls: type, globs: list[re.Pattern[str]], qualified: list[str], exact: bool
) -> bool:
    lineage = (cls,) if exact else cls.__mro__
    for candidate in lineage:
        if any(pattern.fullmatch(candidate.__name__) for pattern in globs):
            return True
        if any(_qualified_name(candidate) == spec for spec in qualified):
            return True
    for spec in qualified:
        # `torch.nn.Linear` is defined in `torch.nn.modules.linear`, so an
        # exported alias is resolved through the modules already imported.
        target = _resolve_imported(spec)
        if isinstance(target, type) and (
            cls is target or (not exact and issubclass(cls, target))
        ):
            return True
    return False


def _shorten(name: str, limit: int = 120) -> str:
    if len(name) <= limit:
        return repr(name)
    return repr(name[: limit // 2] + "..." + name[-limit // 2 :])


def _anchor_segment(glob: str) -> str | None:
    """Return a dotted segment that every name matching ``glob`` contains.

    A glob segment without wildcards, classes, alternatives or escapes can
    only match an equal segment of the name, since ``*`` and ``?`` stay
    within one segment and ``**`` spans whole ones. The longest such segment
    is returned, as the one least likely to be shared by many names.
    """
    if any(char in glob for char in "{}\\"):
        return None
    literal = [
        segment
        for segment in glob.split(".")
        if segment and not any(char in segment for char in "*?[]")
    ]
    return max(literal, key=len) if literal else None


_NO_CAPTURES: Mapping[str, str] = MappingProxyType({})


def _static_key(info: TensorInfo) -> tuple[object, ...]:
    """Return everything but the name that a rule's predicates look at."""
    return (
        info.kind,
        info.ndim,
        info.dtype,
        info.local_name,
        info.module_class,
        info.ancestor_classes,
    )


@dataclass(frozen=True)
class _Candidates:
    """The rules that can win for tensors with one static key.

    Attributes:
        last: Position of the first rule whose static predicates hold and
            that has no name or regex, so it wins unless an earlier one
            does; ``None`` if there is no such rule.
        anchored: Earlier rules with a name glob, by their anchor segment.
        unanchored: Earlier rules with a regex or a glob without an anchor.
    """

    last: int | None
    anchored: Mapping[str, tuple[int, ...]]
    unanchored: tuple[int, ...]


class _CompiledRule:
    """One rule's predicates, compiled; cheap predicates are tested first."""

    def __init__(self, index: int, rule: Rule) -> None:
        match: Match = rule.match
        self.index = index
        self.rule = rule
        self.kind = match.kind
        self.ndim = frozenset(match.ndim) if match.ndim is not None else None
        self.dtype = frozenset(match.dtype) if match.dtype is not None else None
        self.param = compile_glob(match.param) if match.param is not None else None
        self.param_cache: dict[str, bool] = {}
        self.name = compile_glob(match.name) if match.name is not None else None
        self.anchor = _anchor_segment(match.name) if match.name is not None else None
        self.regex = regex.compile(match.regex) if match.regex is not None else None
        self.module = (
            _ClassPredicate(match.module, match.exact) if match.module else None
        )
        self.within = _ClassPredicate(match.within, False) if match.within else None

    def test(self, info: TensorInfo) -> Mapping[str, str] | None:
        """Return the captures if every predicate holds, else ``None``."""
        if not self.test_static(info):
            return None
        return self.test_name(info)

    def test_static(self, info: TensorInfo) -> bool:
        """Test every predicate except ``name`` and ``regex``.

        The result depends only on :func:`_static_key` of the tensor, so the
        matcher caches it per key.
        """
        if info.kind != self.kind:
            return False
        if self.ndim is not None and info.ndim not in self.ndim:
            return False
        if self.dtype is not None and info.dtype not in self.dtype:
            return False
        if self.param is not None and not self._param_matches(info.local_name):
            return False
        if self.module is not None and not self.module(info.module_class):
            return False
        return self.within is None or any(map(self.within, info.ancestor_classes))

    def test_name(self, info: TensorInfo) -> Mapping[str, str] | None:
        """Test the ``name`` and ``regex`` predicates; return the captures."""
        if self.name is not None and not self.name.fullmatch(info.name):
            return None
        if self.regex is not None:
            return self._regex_captures(info.name)
        return {}

    def failed_predicates(self, info: TensorInfo) -> list[tuple[str, str]]:
        """Return each predicate that fails on ``info``, with the tensor's value."""
        failed: list[tuple[str, str]] = []
        if info.kind != self.kind:
            failed.append(("kind", info.kind))
        if self.ndim is not None and info.ndim not in self.ndim:
            failed.append(("ndim", str(info.ndim)))
        if self.dtype is not None and info.dtype not in self.dtype:
            failed.append(("dtype", info.dtype))
        if self.param is not None and not self._param_matches(info.local_name):
            failed.append(("param", info.local_name))
        if self.module is not None and not self.module(info.module_class):
            failed.append(("module", info.module_class.__name__))
        if self.within is not None and not any(map(self.within, info.ancestor_classes)):
            ancestors = ", ".join(cls.__name__ for cls in info.ancestor_classes)
            failed.append(("within", ancestors or "no ancestors"))
        if self.name is not None and not self.name.fullmatch(info.name):
            failed.append(("name", info.name))
        if self.regex is not None and self._regex_captures(info.name) is None:
            failed.append(("regex", info.name))
        return failed

    def _param_matches(self, local_name: str) -> bool:
        hit = self.param_cache.get(local_name)
        if hit is None:
            assert self.param is not None
            hit = self.param.fullmatch(local_name) is not None
            self.param_cache[local_name] = hit
        return hit

    def _regex_captures(self, name: str) -> Mapping[str, str] | None:
        assert self.regex is not None
        try:
            found = self.regex.fullmatch(name, timeout=REGEX_TIMEOUT_S)
        except TimeoutError:
            raise PolicyError.at(
                self.rule.location,
                f"the regex {self.regex.pattern!r} of "
                f"{self.rule.label(self.index, with_location=False)} timed out after "
                f"{REGEX_TIMEOUT_S} s on the tensor name {_shorten(name)}; "
                "simplify it (avoid repeats whose branches overlap, such as "
                "'(a|aa)+' or '(a+)+')",
            ) from None
        if found is None:
            return None
        return {
            key: value for key, value in found.groupdict().items() if value is not None
        }


class Matcher:
    """A policy compiled for matching: finds the winning rule per tensor.

    Example:
        >>> from initrules import load_policy
        >>> policy = load_policy(text="rules: [{match: {param: bias}, init: zeros}]")
        >>> matcher = Matcher(policy)
    """

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._rules = [
            _CompiledRule(index, rule) for index, rule in enumerate(policy.rules)
        ]
        self._candidates: dict[tuple[object, ...], _Candidates] = {}
        # Results without captures are shared: building a frozen dataclass per
        # tensor costs more than resolving its rule.
        self._plain_results = [
            MatchResult(compiled.index, compiled.rule, _NO_CAPTURES)
            for compiled in self._rules
        ]

    def match(
        self, info: TensorInfo, *, all_matches: bool = False
    ) -> MatchResult | None:
        """Return the first rule whose predicates all hold, or ``None``.

        Args:
            info: The tensor to match.
            all_matches: Also test the later rules and list those that match
                in ``also_matched`` (used by reports, ``explain`` and lint).

        Raises:
            PolicyError: A rule's regex timed out on this tensor's name.
        """
        if all_matches:
            return self._match_all(info)
        candidates = self._candidates_for(info)
        positions = candidates.unanchored
        if candidates.anchored:
            found = [
                position
                for segment in set(info.name.split("."))
                for position in candidates.anchored.get(segment, ())
            ]
            if found:
                positions = tuple(sorted((*positions, *found)))
        for position in positions:
            compiled = self._rules[position]
            captures = compiled.test_name(info)
            if captures:
                return MatchResult(compiled.index, compiled.rule, captures)
            if captures is not None:
                return self._plain_results[position]
        if candidates.last is None:
            return None
        return self._plain_results[candidates.last]

    def _candidates_for(self, info: TensorInfo) -> _Candidates:
        """Return the rules that can win for ``info``, cached by its static key.

        Resolving a tensor then costs a few dictionary lookups and the name
        tests of the few rules whose anchor segment the name contains, however
        many rules the policy has.
        """
        key = _static_key(info)
        found = self._candidates.get(key)
        if found is not None:
            return found
        last: int | None = None
        anchored: dict[str, list[int]] = {}
        unanchored: list[int] = []
        for position, compiled in enumerate(self._rules):
            if not compiled.test_static(info):
                continue
            if compiled.name is None and compiled.regex is None:
                last = position
                break
            if compiled.regex is None and compiled.anchor is not None:
                anchored.setdefault(compiled.anchor, []).append(position)
            else:
                unanchored.append(position)
        found = _Candidates(
            last,
            {segment: tuple(items) for segment, items in anchored.items()},
            tuple(unanchored),
        )
        self._candidates[key] = found
        return found

    def _match_all(self, info: TensorInfo) -> MatchResult | None:
        for position, compiled in enumerate(self._rules):
            captures = compiled.test(info)
            if captures is None:
                continue
            also = tuple(
                later.index
                for later in self._rules[position + 1 :]
                if later.test(info) is not None
            )
            return MatchResult(compiled.index, compiled.rule, captures, also)
        return None

    def later_matches(self, info: TensorInfo, after: int) -> Iterator[MatchResult]:
        """Yield, in policy order, every rule after index ``after`` that matches.

        The planner uses it to give each block of a split tensor its rule.
        """
        for compiled in self._rules[after + 1 :]:
            captures = compiled.test(info)
            if captures is not None:
                yield MatchResult(compiled.index, compiled.rule, captures)

    def near_misses(self, info: TensorInfo) -> list[tuple[int, str, str]]:
        """Return the rules that fail on exactly one predicate for ``info``.

        Each item is ``(rule_index, predicate, the tensor's value for it)``;
        ``explain`` shows them for tensors that no rule matched.
        """
        misses: list[tuple[int, str, str]] = []
        for compiled in self._rules:
            failed = compiled.failed_predicates(info)
            if len(failed) == 1:
                misses.append((compiled.index, *failed[0]))
        return misses
