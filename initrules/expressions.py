"""Arithmetic expressions in scheme arguments, parsed once and evaluated per tensor.

A numeric argument may be a string such as ``"0.02 / sqrt(2 * config.n_layer)"``.
It is parsed with :mod:`ast` and checked against a whitelist at load time;
nothing is ever passed to ``eval``. Allowed:

* numbers, ``+ - * / // % **``, unary ``+ -`` and parentheses;
* the functions ``sqrt``, ``log``, ``exp``, ``min``, ``max`` and ``abs``;
* names: the policy's ``vars``, the named groups of the rule's regex (as
  integers), ``fan_in``, ``fan_out``, ``numel``, and ``shape[i]``;
* ``module.NAME`` and ``config.NAME``: a numeric attribute of the owning
  module, or of the model's config. These one-level forms are the only
  attribute access, and names starting with ``_`` are rejected.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["BUILTIN_NAMES", "RESERVED_NAMES", "Expression", "ExpressionError", "Scope"]

# Names every expression may use, whatever the policy declares.
BUILTIN_NAMES = frozenset({"fan_in", "fan_out", "numel", "shape"})

_FUNCTIONS: dict[str, Callable[..., float]] = {
    "sqrt": math.sqrt,
    "log": math.log,
    "exp": math.exp,
    "min": min,
    "max": max,
    "abs": abs,
}

_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}

_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
}

# Objects whose attributes an expression may read, one level deep.
_OWNERS = frozenset({"module", "config"})

# Names a policy's vars cannot take.
RESERVED_NAMES = BUILTIN_NAMES | _OWNERS | frozenset(_FUNCTIONS)

# Results beyond this magnitude are rejected, and so are powers that would
# produce them, so that `10 ** 10 ** 10` fails fast instead of hanging.
_MAX_MAGNITUDE = 1e300
_MAX_TEXT = 1000


class ExpressionError(ValueError):
    """An expression is not allowed arithmetic, or its evaluation failed."""


@dataclass(frozen=True)
class Expression:
    """A parsed, whitelisted arithmetic expression.

    Attributes:
        text: The source text.
        names: The bare names it uses (vars, captures, builtins).
        attributes: The ``module.NAME`` and ``config.NAME`` pairs it reads.
    """

    text: str
    tree: ast.expr
    names: frozenset[str]
    attributes: frozenset[tuple[str, str]]

    @classmethod
    def parse(cls, text: str) -> Expression:
        """Parse ``text``; raise ExpressionError for anything not allowed."""
        if len(text) > _MAX_TEXT:
            raise ExpressionError(
                f"expression is {len(text)} characters long; the limit is {_MAX_TEXT}"
            )
        names: set[str] = set()
        attributes: set[tuple[str, str]] = set()
        try:
            tree = ast.parse(text.strip(), mode="eval").body
            _check(tree, text, names, attributes)
        except SyntaxError as error:
            raise ExpressionError(f"invalid expression {text!r}: {error.msg}") from None
        except (RecursionError, MemoryError):
            raise ExpressionError(
                f"expression {_shortened(text)!r} is nested too deeply"
            ) from None
        return cls(text, tree, frozenset(names), frozenset(attributes))

    def evaluate(self, scope: Scope) -> float:
        """Return the value for one tensor; raise ExpressionError on failure."""
        try:
            value = _evaluate(self.tree, scope)
        except ZeroDivisionError:
            raise ExpressionError(f"{self.text!r} divides by zero") from None
        except (OverflowError, ValueError, TypeError) as error:
            if isinstance(error, ExpressionError):
                raise
            raise ExpressionError(f"{self.text!r} failed: {error}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ExpressionError(f"{self.text!r} gives {value!r}, not a number")
        if isinstance(value, float) and not math.isfinite(value):
            raise ExpressionError(f"{self.text!r} gives {value!r}, not a finite number")
        # Compared as Python numbers: an integer may be too large for a float.
        if abs(value) > _MAX_MAGNITUDE:
            raise ExpressionError(
                f"{self.text!r} gives a value beyond {_MAX_MAGNITUDE:g}, too large "
                "for an argument"
            )
        return value


def _shortened(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else f"{text[:limit]}..."


@dataclass(frozen=True)
class Scope:
    """Values of an expression's names for one tensor.

    Attributes:
        values: Bare names (vars, captures, fan_in, fan_out, numel).
        shape: The tensor's shape, for ``shape[i]``.
        module: The owning module, for ``module.NAME``.
        config: The model's config, for ``config.NAME``; ``None`` if the
            model has none.
    """

    values: Mapping[str, float]
    shape: tuple[int, ...]
    module: object
    config: object | None


def _not_allowed(node: ast.AST, text: str, what: str) -> ExpressionError:
    return ExpressionError(
        f"invalid expression {text!r}: {what} is not allowed; use numbers, + - * / "
        "// % **, parentheses, sqrt/log/exp/min/max/abs, vars, regex groups, "
        "fan_in, fan_out, numel, shape[i], module.NAME and config.NAME"
    )


def _check(
    node: ast.expr, text: str, names: set[str], attributes: set[tuple[str, str]]
) -> None:
    """Walk the tree and reject every node outside the whitelist."""
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise _not_allowed(node, text, f"the constant {node.value!r}")
        return
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        _check(node.left, text, names, attributes)
        _check(node.right, text, names, attributes)
        return
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        _check(node.operand, text, names, attributes)
        return
    if isinstance(node, ast.Name):
        if node.id in _OWNERS or node.id in _FUNCTIONS or node.id == "shape":
            raise _not_allowed(node, text, f"the bare name {node.id!r}")
        names.add(node.id)
        return
    if isinstance(node, ast.Attribute):
        owner = node.value
        if not (isinstance(owner, ast.Name) and owner.id in _OWNERS):
            raise _not_allowed(
                node, text, "an attribute other than module.NAME or config.NAME"
            )
        if node.attr.startswith("_"):
            raise _not_allowed(node, text, f"the private attribute {node.attr!r}")
        attributes.add((owner.id, node.attr))
        return
    if isinstance(node, ast.Call):
        function = node.func
        if not (isinstance(function, ast.Name) and function.id in _FUNCTIONS):
            raise _not_allowed(
                node, text, "a call of anything but sqrt/log/exp/min/max/abs"
            )
        if node.keywords or not node.args:
            raise _not_allowed(node, text, "a call without plain arguments")
        arity_ok = (
            len(node.args) >= 2
            if function.id in ("min", "max")
            else len(node.args) == 1
        )
        if not arity_ok:
            wanted = (
                "at least 2 arguments"
                if function.id in ("min", "max")
                else "1 argument"
            )
            raise ExpressionError(
                f"invalid expression {text!r}: {function.id}() takes {wanted}, "
                f"got {len(node.args)}"
            )
        for argument in node.args:
            if isinstance(argument, ast.Starred):
                raise _not_allowed(node, text, "a starred argument")
            _check(argument, text, names, attributes)
        return
    if isinstance(node, ast.Subscript):
        target, index = node.value, node.slice
        if not (
            isinstance(target, ast.Name)
            and target.id == "shape"
            and _integer_literal(index) is not None
        ):
            raise _not_allowed(node, text, "indexing other than shape[i]")
        names.add("shape")
        return
    raise _not_allowed(node, text, f"a {type(node).__name__} expression")


def _integer_literal(node: ast.expr) -> int | None:
    """Return the value of ``3`` or ``-1``, else ``None``."""
    sign = 1
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        sign, node = -1, node.operand
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return sign * node.value
    return None


def _evaluate(node: ast.expr, scope: Scope) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.BinOp):
        left = _evaluate(node.left, scope)
        right = _evaluate(node.right, scope)
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        return _BINARY[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp):
        return _UNARY[type(node.op)](_evaluate(node.operand, scope))
    if isinstance(node, ast.Name):
        if node.id not in scope.values:
            raise ExpressionError(f"{node.id!r} has no value for this tensor")
        return scope.values[node.id]
    if isinstance(node, ast.Attribute):
        assert isinstance(node.value, ast.Name)
        return _read_attribute(scope, node.value.id, node.attr)
    if isinstance(node, ast.Call):
        assert isinstance(node.func, ast.Name)
        arguments = [_evaluate(argument, scope) for argument in node.args]
        return _FUNCTIONS[node.func.id](*arguments)
    assert isinstance(node, ast.Subscript)
    index = _integer_literal(node.slice)
    assert index is not None
    if not -len(scope.shape) <= index < len(scope.shape):
        raise ExpressionError(
            f"shape[{index}] is out of range for a {len(scope.shape)}-D tensor"
        )
    return scope.shape[index]


def _check_power(base: Any, exponent: Any) -> None:
    if not isinstance(base, (int, float)) or not isinstance(exponent, (int, float)):
        return
    if base in (0, 1, -1) or exponent <= 0:
        return
    if exponent * math.log10(abs(base)) > math.log10(_MAX_MAGNITUDE):
        raise ExpressionError(f"{base!r} ** {exponent!r} is beyond {_MAX_MAGNITUDE:g}")


def _read_attribute(scope: Scope, owner_name: str, attribute: str) -> float:
    owner = scope.module if owner_name == "module" else scope.config
    if owner is None:
        raise ExpressionError(
            f"{owner_name}.{attribute} is not available: the model has no config"
        )
    value = getattr(owner, attribute, None)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        found = "no such attribute" if value is None else f"a {type(value).__name__}"
        raise ExpressionError(f"{owner_name}.{attribute} is not a number ({found})")
    return value
