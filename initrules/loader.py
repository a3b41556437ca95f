"""Load a policy from YAML, with file:line:column on every error.

YAML is read with PyYAML's safe loader (no object construction from tags).
The node tree is converted to plain Python values while the position of
every key and value is recorded, so that a Pydantic error location such as
``('rules', 2, 'init', 'mode')`` maps back to the line that caused it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import regex
import yaml
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from initrules.errors import PolicyError, SourceLocation
from initrules.expressions import BUILTIN_NAMES
from initrules.schema import InitSpec, Match, Policy, Rule
from initrules.schemes import get_scheme

__all__ = ["load_policy"]

Loc = tuple[Any, ...]


def load_policy(
    path: str | os.PathLike[str] | None = None, *, text: str | None = None
) -> Policy:
    """Load and validate a policy from a YAML file or from YAML text.

    Args:
        path: The policy file to read.
        text: YAML text to parse instead of a file.

    Returns:
        The validated policy. Each rule carries its position in the file.

    Raises:
        PolicyError: The file cannot be read, or the YAML or the policy is
            invalid. The error carries the path, line and column.

    Example:
        >>> policy = load_policy(text="rules: [{match: {param: bias}, init: zeros}]")
        >>> policy.rules[0].init.scheme
        'zeros'
    """
    if (path is None) == (text is None):
        raise TypeError("load_policy() needs exactly one of path or text=...")
    return _load(path, text, ())


def _load(
    path: str | os.PathLike[str] | None, text: str | None, chain: tuple[str, ...]
) -> Policy:
    """Load one file (or text) of an ``extends`` chain."""
    if path is not None:
        source = os.fspath(path)
        try:
            text = Path(source).read_text(encoding="utf-8")
        except FileNotFoundError:
            hint = ""
            if "\n" in source or "rules:" in source:
                hint = "; to load YAML text, use load_policy(text=...)"
            raise PolicyError(f"policy file not found{hint}", path=source) from None
        except (OSError, UnicodeDecodeError) as error:
            raise PolicyError(
                f"cannot read policy file: {error}", path=source
            ) from None
    else:
        source = "<text>"
    assert text is not None
    return _parse(text, source, chain)


def _parse(text: str, source: str, chain: tuple[str, ...] = ()) -> Policy:
    data, positions = _compose(text, source)
    if not isinstance(data, dict):
        location = positions.value_at(()) or SourceLocation(source, 1, 1)
        found = "an empty document" if data is None else f"a {_yaml_type(data)}"
        raise PolicyError.at(
            location,
            f"expected a mapping with 'rules' at the top level, found {found}",
            path=source,
        )
    try:
        policy = Policy.model_validate(data)
    except ValidationError as error:
        raise _policy_error(error, data, positions) from None
    policy._path = source
    for index, rule in enumerate(policy.rules):
        rule._location = positions.value_at(("rules", index))
    if policy.extends:
        bases = _load_bases(policy, source, chain, positions)
        policy = _merge(policy, bases)
    _check_expression_names(policy, positions)
    return policy


def _load_bases(
    policy: Policy, source: str, chain: tuple[str, ...], positions: _Positions
) -> list[Policy]:
    """Load the files a policy extends, relative to its own file."""
    here = Path(source).parent if source != "<text>" else Path.cwd()
    identity = str(Path(source).resolve()) if source != "<text>" else source
    chain = (*chain, identity)
    bases = []
    for index, name in enumerate(policy.extends):
        location = positions.value_at(("extends", index)) or positions.value_at(
            ("extends",)
        )
        target = here / name
        if str(target.resolve()) in chain:
            cycle = " -> ".join([*chain, str(target.resolve())])
            raise PolicyError.at(
                location, f"'extends' makes a cycle: {cycle}", path=source
            )
        if not target.is_file():
            raise PolicyError.at(
                location,
                f"'extends' names {name!r}, but {target} is not a file (paths are "
                "relative to the extending file)",
                path=source,
            )
        bases.append(_load(target, None, chain))
    return bases


def _merge(policy: Policy, bases: list[Policy]) -> Policy:
    """Combine a policy with the policies it extends.

    Its own rules come first, so they take precedence, then each base's in
    the listed order. A file reached twice (two bases that extend one
    shared file) gives its rules once, where it is first reached. Vars and
    options the file sets win over the bases'; among the bases, the first
    listed that sets one wins.
    """
    rules = list(policy.rules)
    placed = {str(rule.location) for rule in rules if rule.location is not None}
    for base in bases:
        for rule in base.rules:
            where = str(rule.location) if rule.location is not None else None
            if where is not None and where in placed:
                continue
            if where is not None:
                placed.add(where)
            rules.append(rule)
    updates: dict[str, Any] = {
        "rules": rules,
        "vars": {
            **{k: v for base in reversed(bases) for k, v in base.vars.items()},
            **policy.vars,
        },
        "extends": [],
    }
    for field in ("name", "description", "on_unmatched", "checks", "lint_ignore"):
        if field in policy.model_fields_set:
            continue
        for base in bases:
            if field in base.model_fields_set:
                updates[field] = getattr(base, field)
                break
    merged = policy.model_copy(update=updates)
    merged._path = policy.path
    return merged


def _check_expression_names(policy: Policy, positions: _Positions) -> None:
    """Reject names that no var, regex group or built-in name defines."""
    for index, rule in enumerate(policy.rules):
        groups: set[str] = set()
        if rule.match.regex is not None:
            groups = set(regex.compile(rule.match.regex).groupindex)
        known = set(policy.vars) | groups | BUILTIN_NAMES
        for key, expression in rule.init.expressions.items():
            unknown = sorted(expression.names - known)
            if not unknown:
                continue
            location = positions.value_at(("rules", index, "init", key))
            defined = ", ".join(sorted(known))
            raise PolicyError.at(
                location,
                f"'init.{key}' of rule {index + 1}: unknown name {unknown[0]!r} in "
                f"{expression.text!r}; names defined here: {defined} (declare "
                "others under 'vars', or name a group of the rule's regex)",
                path=positions.source,
            )


class _Positions:
    """Start positions of YAML keys and values, by path from the document root."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.values: dict[Loc, yaml.Mark] = {}
        self.keys: dict[Loc, yaml.Mark] = {}

    def value_at(self, loc: Loc) -> SourceLocation | None:
        """Position of the deepest existing value on ``loc``."""
        for end in range(len(loc), -1, -1):
            mark = self.values.get(loc[:end])
            if mark is not None:
                return self._location(mark)
        return None

    def key_at(self, loc: Loc) -> SourceLocation | None:
        """Position of the key that ends ``loc``, else of the deepest value."""
        mark = self.keys.get(loc)
        return self._location(mark) if mark is not None else self.value_at(loc)

    def _location(self, mark: yaml.Mark) -> SourceLocation:
        return SourceLocation(self.source, mark.line + 1, mark.column + 1)


_INT_TAG = "tag:yaml.org,2002:int"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_BOOL_TAG = "tag:yaml.org,2002:bool"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_PLAIN_TAGS = ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq")

# Aliases let a short document expand to a huge tree; beyond this many
# nodes after expansion the policy is rejected before validation.
MAX_EXPANDED_NODES = 100_000


class _NodeReader(yaml.SafeLoader):
    """Safe loader with YAML 1.2 scalars; conversion is done by ``_Converter``.

    PyYAML resolves scalars by YAML 1.1, where ``2e-2`` is a string, ``010``
    is octal 8, ``1:30`` is 90 and ``on`` is True. YAML 1.2 (and JSON) read
    these as a float, decimal 10, and two strings, which is what policy
    authors expect.
    """

    yaml_implicit_resolvers = {
        first: [
            (tag, pattern)
            for tag, pattern in resolvers
            if tag not in (_INT_TAG, _FLOAT_TAG, _BOOL_TAG)
        ]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = str(loader.construct_scalar(node)).replace("_", "")
    sign = -1 if text.startswith("-") else 1
    digits = text.lstrip("+-")
    if digits[:2] in ("0x", "0X"):
        return sign * int(digits[2:], 16)
    if digits[:2] in ("0o", "0O"):
        return sign * int(digits[2:], 8)
    return sign * int(digits, 10)


_NodeReader.add_implicit_resolver(
    _BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_NodeReader.add_implicit_resolver(
    _INT_TAG,
    re.compile(r"^(?:[-+]?[0-9][0-9_]*|0[oO][0-7_]+|0[xX][0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)
_NodeReader.add_implicit_resolver(
    _FLOAT_TAG,
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?
        |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.VERBOSE,
    ),
    list("-+0123456789."),
)
_NodeReader.add_constructor(_INT_TAG, _construct_int)


def _compose(text: str, source: str) -> tuple[Any, _Positions]:
    positions = _Positions(source)
    loader: _NodeReader | None = None
    try:
        loader = _NodeReader(text)
        node = loader.get_single_node()
        if node is None:
            return None, positions
        return _Converter(loader, positions).convert(node, ()), positions
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        reason = f"invalid YAML: {error.problem or error.context}"
        if error.problem and error.context:
            reason += f" ({error.context})"
        if mark is None:
            raise PolicyError(reason, path=source) from None
        raise PolicyError(
            reason, path=source, line=mark.line + 1, column=mark.column + 1
        ) from None
    except yaml.reader.ReaderError as error:
        line, column = _line_column(text, error.position)
        raise PolicyError(
            f"invalid YAML: the character U+{error.character:04X} is not allowed",
            path=source,
            line=line,
            column=column,
        ) from None
    except RecursionError:
        raise PolicyError(
            "invalid YAML: nesting is too deep", path=source, line=1, column=1
        ) from None
    except (ValueError, OverflowError) as error:
        # PyYAML's scanner lets these escape for escapes such as "\U80000000".
        mark = loader.get_mark() if loader is not None else None
        line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        raise PolicyError(
            f"invalid YAML: {error}", path=source, line=line, column=column
        ) from None
    finally:
        if loader is not None:
            loader.dispose()


def _line_column(text: str, offset: int) -> tuple[int, int]:
    before = text[:offset]
    line = before.count("\n") + 1
    return line, offset - (before.rfind("\n") + 1) + 1


class _Converter:
    """Convert composed YAML nodes to Python values, recording positions.

    A node reached again through an alias is converted once and shared, and
    the size of the expanded tree is bounded by ``MAX_EXPANDED_NODES``.
    """

    # NOTE: PyYAML's composer returns the anchored node for an alias, so a rule
    # written as `- *name` reports the anchor's position, not the alias's.

    def __init__(self, loader: yaml.SafeLoader, positions: _Positions) -> None:
        self.loader = loader
        self.positions = positions
        self.converted: dict[int, Any] = {}
        self.sizes: dict[int, int] = {}

    def convert(self, node: yaml.Node, loc: Loc) -> Any:
        self.positions.values.setdefault(loc, node.start_mark)
        if id(node) in self.converted:
            return self.converted[id(node)]
        if isinstance(node, yaml.MappingNode):
            self._check_tag(node)
            value: Any = self._mapping(node, loc)
        elif isinstance(node, yaml.SequenceNode):
            self._check_tag(node)
            value = [
                self.convert(item, (*loc, index))
                for index, item in enumerate(node.value)
            ]
        else:
            value = self.loader.construct_object(node, deep=True)
        self.converted[id(node)] = value
        if self._size(node) > MAX_EXPANDED_NODES:
            raise yaml.MarkedYAMLError(
                problem=f"the document expands to more than {MAX_EXPANDED_NODES:,} "
                "nodes through aliases",
                problem_mark=node.start_mark,
            )
        return value

    def _size(self, node: yaml.Node) -> int:
        size = self.sizes.get(id(node))
        if size is None:
            children: list[yaml.Node] = []
            if isinstance(node, yaml.MappingNode):
                children = [child for pair in node.value for child in pair]
            elif isinstance(node, yaml.SequenceNode):
                children = list(node.value)
            size = 1 + sum(self.sizes.get(id(child), 1) for child in children)
            self.sizes[id(node)] = size
        return size

    @staticmethod
    def _check_tag(node: yaml.Node) -> None:
        if node.tag not in _PLAIN_TAGS:
            raise yaml.MarkedYAMLError(
                problem=f"the tag {node.tag!r} is not allowed in a policy",
                problem_mark=node.start_mark,
            )

    def _mapping(self, node: yaml.MappingNode, loc: Loc) -> dict[Any, Any]:
        merged: dict[Any, Any] = {}
        result: dict[Any, Any] = {}
        explicit: dict[Any, yaml.Mark] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                self._merge(merged, value_node, loc)
                continue
            key = self._key(key_node)
            if key in explicit:
                raise yaml.MarkedYAMLError(
                    problem=f"duplicate key {key!r} (first defined on line "
                    f"{explicit[key].line + 1})",
                    problem_mark=key_node.start_mark,
                )
            explicit[key] = key_node.start_mark
            self.positions.keys[(*loc, key)] = key_node.start_mark
            result[key] = self.convert(value_node, (*loc, key))
        # Explicit keys win over merged ones, wherever the '<<' key is.
        return {**merged, **result}

    def _merge(self, result: dict[Any, Any], value_node: yaml.Node, loc: Loc) -> None:
        """Apply a ``<<`` merge: explicit keys win, then earlier merged mappings."""
        if isinstance(value_node, yaml.SequenceNode):
            sources = list(value_node.value)
        else:
            sources = [value_node]
        for source in reversed(sources):
            if not isinstance(source, yaml.MappingNode):
                raise yaml.MarkedYAMLError(
                    problem="a merge key '<<' needs a mapping or a list of mappings",
                    problem_mark=source.start_mark,
                )
            merged = self.convert(source, loc)
            result.update(merged)

    def _key(self, key_node: yaml.Node) -> Any:
        key = self.loader.construct_object(key_node, deep=True)
        if not isinstance(key, (str, int, float, bool)) and key is not None:
            raise yaml.MarkedYAMLError(
                problem="a mapping key must be a plain value",
                problem_mark=key_node.start_mark,
            )
        return key


def _yaml_type(value: Any) -> str:
    if isinstance(value, list):
        return "list"
    if isinstance(value, str):
        return "string"
    return type(value).__name__


# --- Pydantic errors to PolicyError ---------------------------------------


def _policy_error(
    error: ValidationError, data: Any, positions: _Positions
) -> PolicyError:
    """Turn the first validation error into a positioned PolicyError.

    Unknown keys come first, because a misspelled key also makes the key it
    was meant to be "missing"; then errors are taken in file order.
    """
    located = []
    for detail in error.errors(include_url=False):
        loc = tuple(detail["loc"])
        if detail["type"] == "extra_forbidden":
            location = positions.key_at(loc)
        else:
            location = positions.value_at(loc)
        position = (location.line, location.column) if location else (0, 0)
        located.append(
            (detail["type"] != "extra_forbidden", position, detail, location)
        )
    located.sort(key=lambda item: item[:2])
    _, _, first, location = located[0]
    reason = _describe(first, tuple(first["loc"]), data)
    others = len(located) - 1
    if others:
        reason += f" (and {others} more error{'s' if others > 1 else ''})"
    return PolicyError.at(location, reason, path=positions.source)


def _describe(detail: ErrorDetails, loc: Loc, data: Any) -> str:
    kind = detail["type"]
    where = _where(loc)
    if kind == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1], data)
        listing = f"; valid keys: {', '.join(allowed)}" if allowed else ""
        return f"unknown key {loc[-1]!r} in {_where(loc[:-1])}{listing}"
    if kind == "missing":
        return f"missing required key {loc[-1]!r} in {_where(loc[:-1])}"
    message = detail["msg"]
    if kind.startswith("value_error"):
        message = message.removeprefix("Value error, ")
    elif kind not in ("unknown_scheme", "init_type", "scheme_type"):
        message = f"{message[:1].lower()}{message[1:]}, got {_short(detail['input'])}"
    return f"{where}: {message}"


def _where(loc: Loc) -> str:
    """Describe a location for a reader: ``'init.mode' of rule 2``."""
    if not loc:
        return "the policy"
    if loc[0] == "rules" and len(loc) >= 2 and isinstance(loc[1], int):
        rule = f"rule {loc[1] + 1}"
        rest = ".".join(str(segment) for segment in loc[2:])
        return f"{rest!r} of {rule}" if rest else rule
    return repr(".".join(str(segment) for segment in loc))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _allowed_keys(loc: Loc, data: Any) -> list[str]:
    """Valid keys of the mapping at ``loc``, for 'unknown key' messages."""
    if loc == ():
        return sorted(Policy.model_fields)
    if len(loc) == 2 and loc[0] == "rules":
        return sorted(Rule.model_fields)
    if len(loc) == 3 and loc[0] == "rules" and loc[2] == "match":
        return sorted(Match.model_fields)
    if len(loc) == 3 and loc[0] == "rules" and loc[2] == "init":
        try:
            raw = data["rules"][loc[1]]["init"]
            fields = get_scheme(raw["scheme"]).args_model.model_fields
        except (KeyError, TypeError, IndexError):
            return sorted(InitSpec.model_fields)
        return ["scheme", *sorted(fields)]
    return []
