"""Pydantic models of a policy, and the JSON Schema generated from them.

A policy is an ordered list of rules. Each rule has a ``match`` (predicates
on a tensor, all of which must hold) and an ``init`` (a scheme and its
arguments). Validation here is structural: patterns compile, scheme names
exist, scheme arguments fit the scheme. Whether a rule can apply to a given
tensor is decided by the planner.
"""

from __future__ import annotations

import inspect
import math
import typing
from typing import Any, Literal

import regex
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import (
    ErrorDetails,
    InitErrorDetails,
    PydanticCustomError,
    core_schema,
)

from initrules.errors import SourceLocation
from initrules.expressions import RESERVED_NAMES, Expression, ExpressionError
from initrules.globs import GlobError, compile_glob
from initrules.schemes import SchemeArgs, get_scheme, scheme_names

__all__ = [
    "Checks",
    "Expect",
    "InitSpec",
    "Match",
    "Policy",
    "Rule",
    "RuleChecks",
    "policy_json_schema",
]

DTypeName = Literal[
    "float16",
    "bfloat16",
    "float32",
    "float64",
    "complex64",
    "complex128",
    "uint8",
    "int8",
    "int16",
    "int32",
    "int64",
    "bool",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def _as_list(value: Any) -> Any:
    return (
        [value]
        if isinstance(value, (str, int)) and not isinstance(value, bool)
        else value
    )


def _check_module_spec(spec: str) -> None:
    """Accept a class name, a qualified name, or a glob on the class name."""
    if "." in spec and any(char in spec for char in "*?[]{},"):
        raise ValueError(
            f"invalid module class {spec!r}: globs apply to the class name only, "
            "not to a qualified name such as torch.nn.Linear"
        )
    if "." in spec:
        if not all(part.isidentifier() for part in spec.split(".")):
            raise ValueError(
                f"invalid module class {spec!r}: expected a qualified name made "
                "of identifiers, such as torch.nn.Linear"
            )
        return
    try:
        compile_glob(spec)
    except GlobError as error:
        raise ValueError(f"invalid module class {spec!r}: {error}") from None


class Match(_Strict):
    """Predicates that select tensors; every predicate given must hold.

    Attributes:
        name: Glob on the canonical dotted name (see :mod:`initrules.globs`).
        regex: Regular expression full-matched against the canonical name.
        module: Class of the owning module: a class name, a qualified name
            or a glob on the class name. With a list, any one may match.
        exact: Match the owning module's own class only, not subclasses.
        within: Class of an ancestor of the owning module (same forms).
        param: Glob on the tensor's local name (``weight``, ``*_proj``).
        ndim: Number of dimensions, or a list of allowed numbers.
        dtype: Dtype name, or a list of allowed names.
        kind: Whether the rule selects parameters or buffers.
        chunk: ``[index, count]``: select one block (0-based) of the tensor
            split into ``count`` equal chunks along ``chunk_dim``, such as
            ``[1, 4]`` for an LSTM's forget gate. The tensor's other blocks
            go to the first later rule that matches them.
        chunk_dim: The dimension that ``chunk`` splits.
    """

    name: str | None = None
    regex: str | None = None
    module: list[str] | None = None
    exact: bool = False
    within: list[str] | None = None
    param: str | None = None
    ndim: list[int] | None = None
    dtype: list[DTypeName] | None = None
    kind: Literal["parameter", "buffer"] = "parameter"
    chunk: list[int] | None = None
    chunk_dim: int = Field(0, ge=0, le=63)

    @field_validator("module", "within", "ndim", "dtype", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return _as_list(value)

    @field_validator("name", "param")
    @classmethod
    def _glob_compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                compile_glob(value)
            except GlobError as error:
                raise ValueError(f"invalid glob: {error}") from None
        return value

    @field_validator("regex")
    @classmethod
    def _regex_compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                regex.compile(value)
            except (regex.error, OverflowError, RecursionError) as error:
                raise ValueError(f"invalid regex {value!r}: {error}") from None
        return value

    @field_validator("module", "within")
    @classmethod
    def _module_specs(cls, value: list[str] | None) -> list[str] | None:
        for spec in value or []:
            _check_module_spec(spec)
        return value

    @field_validator("ndim")
    @classmethod
    def _ndim_range(cls, value: list[int] | None) -> list[int] | None:
        for ndim in value or []:
            if not 0 <= ndim <= 64:
                raise ValueError(f"invalid ndim {ndim}: expected 0 to 64")
        return value

    @field_validator("param")
    @classmethod
    def _local_name(cls, value: str | None) -> str | None:
        if value is not None and "." in value.replace("\\.", ""):
            raise ValueError(
                f"invalid param {value!r}: param is the tensor's local name "
                "(weight, bias), which has no dots; use 'name' for dotted names"
            )
        return value

    @field_validator("chunk")
    @classmethod
    def _chunk_pair(cls, value: list[int] | None) -> list[int] | None:
        if value is None:
            return None
        if len(value) != 2 or not 0 <= value[0] < value[1] or value[1] < 2:
            raise ValueError(
                f"invalid chunk {value}: expected [index, count] with count >= 2 "
                "and 0 <= index < count, such as [1, 4] for the second of four"
            )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Match:
        if self.name is not None and self.regex is not None:
            raise ValueError("give either 'name' (a glob) or 'regex', not both")
        if self.exact and not self.module:
            raise ValueError(
                "'exact' applies to 'module'; add 'module' or drop 'exact'"
            )
        if self.chunk is None and "chunk_dim" in self.model_fields_set:
            raise ValueError("'chunk_dim' applies to 'chunk'; add 'chunk' or drop it")
        return self


class InitSpec(BaseModel):
    """A scheme name with its validated arguments.

    In YAML this is either a bare scheme name (``init: zeros``) or a mapping
    with ``scheme`` and the scheme's arguments
    (``init: {scheme: kaiming_normal, mode: fan_out}``). A numeric argument
    may be an arithmetic expression in a string
    (``std: "0.02 / sqrt(2 * config.n_layer)"``, see
    :mod:`initrules.expressions`), evaluated for each tensor at plan time.
    With ``chunks``, the tensor is split into equal blocks along ``dim`` and
    the scheme fills each block as a tensor of its own, with its own fans.

    Attributes:
        scheme: The scheme's name.
        args: The validated arguments. With expressions, the fields they set
            hold placeholders until the planner evaluates them per tensor.
        expressions: The arguments given as expressions, by name.
        chunks: Number of equal blocks the scheme fills separately; it must
            divide the tensor's size along ``dim``.
        dim: The dimension that ``chunks`` splits.
    """

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    scheme: str
    args: SchemeArgs
    expressions: dict[str, Expression] = {}
    chunks: int = 1
    dim: int = 0

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, data: Any) -> Any:
        if isinstance(data, InitSpec):
            return data
        if isinstance(data, str):
            data = {"scheme": data}
        if not isinstance(data, dict):
            raise PydanticCustomError(
                "init_type",
                "expected a scheme name or a mapping with 'scheme' and its arguments",
            )
        if isinstance(data.get("args"), SchemeArgs) and set(data) <= {
            "scheme",
            "args",
            "expressions",
            *_SPLIT_KEYS,
        }:
            return data
        arguments = dict(data)
        split = {key: arguments.pop(key) for key in _SPLIT_KEYS if key in arguments}
        _check_split(split)
        name = arguments.pop("scheme", None)
        if name is None:
            raise _error_at("scheme", "missing", "missing required key 'scheme'", data)
        if not isinstance(name, str):
            raise _error_at("scheme", "scheme_type", "expected a scheme name", name)
        try:
            scheme = get_scheme(name)
        except KeyError:
            raise _error_at(
                "scheme",
                "unknown_scheme",
                f"unknown scheme {name!r}; valid schemes: {', '.join(scheme_names())}",
                name,
            ) from None
        expressions: dict[str, Expression] = {}
        for key, value in list(arguments.items()):
            if isinstance(value, str) and _is_numeric(scheme.args_model, key):
                try:
                    expressions[key] = Expression.parse(value)
                except ExpressionError as error:
                    raise _error_at(key, "expression", str(error), value) from None
        if not expressions:
            args = scheme.args_model.model_validate(arguments)
        else:
            args = _template_args(scheme.args_model, arguments, expressions)
        return {"scheme": name, "args": args, "expressions": expressions, **split}

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        choices: list[JsonSchemaValue] = [{"type": "string", "enum": scheme_names()}]
        for name in scheme_names():
            args_schema = get_scheme(name).args_model.model_json_schema()
            properties = {
                "scheme": {"const": name},
                **{
                    key: _or_expression(value)
                    for key, value in args_schema.get("properties", {}).items()
                },
                **_SPLIT_SCHEMA,
            }
            choices.append(
                {
                    "type": "object",
                    "title": name,
                    "properties": properties,
                    "required": ["scheme", *args_schema.get("required", [])],
                    "additionalProperties": False,
                }
            )
        return {
            "oneOf": choices,
            "description": cls.__doc__ and cls.__doc__.split("\n")[0],
        }


# Keys of an init mapping that split the tensor, not arguments of the scheme.
_SPLIT_KEYS = ("chunks", "dim")
_SPLIT_SCHEMA: dict[str, JsonSchemaValue] = {
    "chunks": {
        "type": "integer",
        "minimum": 1,
        "default": 1,
        "description": "Number of equal blocks along 'dim' that the scheme fills "
        "separately, each with its own fans.",
    },
    "dim": {
        "type": "integer",
        "minimum": 0,
        "default": 0,
        "description": "The dimension that 'chunks' splits.",
    },
}


def _check_split(split: dict[str, Any]) -> None:
    for key, value in split.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise _error_at(key, "int_type", f"{key} must be an integer", value)
    if split.get("chunks", 1) < 1:
        raise _error_at("chunks", "chunks", "chunks must be at least 1", split)
    if not 0 <= split.get("dim", 0) <= 63:
        raise _error_at("dim", "dim", "dim must be between 0 and 63", split)
    if "dim" in split and split.get("chunks", 1) == 1:
        raise _error_at(
            "dim",
            "dim_alone",
            "'dim' applies to 'chunks'; add 'chunks' or drop it",
            split,
        )


def _or_expression(schema: JsonSchemaValue) -> JsonSchemaValue:
    """Let a numeric argument's schema also accept an expression string."""
    if schema.get("type") not in ("number", "integer"):
        return schema
    expression = {"type": "string", "description": "arithmetic expression"}
    combined: JsonSchemaValue = {"anyOf": [schema, expression]}
    if "default" in schema:
        combined["default"] = schema["default"]
    return combined


def _is_numeric(model: type[SchemeArgs], key: str) -> bool:
    """Return True for a number field, optional ones (``int | None``) included."""
    field = model.model_fields.get(key)
    if field is None:
        return False
    kinds = set(typing.get_args(field.annotation)) or {field.annotation}
    kinds.discard(type(None))
    return bool(kinds) and kinds <= {float, int}


# Stands in for an expression while the other arguments are validated (an
# int, which strict validation accepts for float and int fields alike).
_PLACEHOLDER = 1


def _template_args(
    model: type[SchemeArgs],
    arguments: dict[str, Any],
    expressions: dict[str, Expression],
) -> SchemeArgs:
    """Validate the constant arguments; expressions are checked per tensor.

    The model is validated with a placeholder for each expression. Errors
    on the other arguments are raised; errors the placeholders cause (a
    bound order, a range) are left for the planner, which validates the
    evaluated arguments of each tensor.
    """
    values = {**arguments, **dict.fromkeys(expressions, _PLACEHOLDER)}
    try:
        return model.model_validate(values)
    except ValidationError as error:
        real = [
            _as_init_error(detail)
            for detail in error.errors()
            if detail["loc"] and detail["loc"][0] not in expressions
        ]
        if real:
            raise ValidationError.from_exception_data(model.__name__, real) from None
    return model.model_construct(None, **values)


def _as_init_error(detail: ErrorDetails) -> InitErrorDetails:
    """Turn a reported error back into one that can be raised again."""
    error: InitErrorDetails = {
        "type": detail["type"],
        "loc": detail["loc"],
        "input": detail["input"],
    }
    if "ctx" in detail:
        error["ctx"] = detail["ctx"]
    return error


def _error_at(field: str, kind: str, message: str, value: Any) -> ValidationError:
    details: InitErrorDetails = {
        "type": PydanticCustomError(kind, message),
        "loc": (field,),
        "input": value,
    }
    return ValidationError.from_exception_data("InitSpec", [details])


def _check_range(value: list[float] | None, what: str) -> list[float] | None:
    if value is None:
        return None
    if len(value) != 2 or value[0] > value[1]:
        raise ValueError(f"{what} must be [low, high] with low <= high, got {value}")
    return value


class Expect(_Strict):
    """Bounds a rule's tensors must meet, measured after init.

    A rule with ``expect`` declares the scale it means, so the plausible-scale
    check (which compares with sqrt(2 / fan_in)) does not apply to it.

    Attributes:
        mean: ``[low, high]`` for the mean of each tensor.
        std: ``[low, high]`` for the standard deviation of each tensor.
        max_abs: Largest magnitude any element may have.
    """

    model_config = ConfigDict(
        extra="forbid", frozen=True, strict=True, allow_inf_nan=False
    )

    mean: list[float] | None = None
    std: list[float] | None = None
    max_abs: float | None = Field(default=None, ge=0.0)

    @field_validator("mean")
    @classmethod
    def _mean_range(cls, value: list[float] | None) -> list[float] | None:
        return _check_range(value, "mean")

    @field_validator("std")
    @classmethod
    def _std_range(cls, value: list[float] | None) -> list[float] | None:
        value = _check_range(value, "std")
        if value is not None and value[0] < 0:
            raise ValueError(f"std bounds cannot be negative, got {value}")
        return value


class RuleChecks(_Strict):
    """Per-rule switches that override the policy's ``checks`` section.

    Attributes:
        finite: Check that no value is NaN or Inf.
        statistics: Compare the measured mean and std with the scheme's.
        scale: Compare the std with sqrt(2 / fan_in) of the owning module.
        bounds: Check bounded draws for values outside or piled on a bound.
    """

    finite: bool | None = None
    statistics: bool | None = None
    scale: bool | None = None
    bounds: bool | None = None


class Checks(_Strict):
    """Settings of the checks on initialized tensors and of what a failure does.

    Attributes:
        enabled: Run checks at all; false turns every check off.
        on_failure: ``raise`` a CheckError with the report attached, or
            ``warn`` with an InitRulesWarning and return the report.
        finite: Check that no value is NaN or Inf.
        statistics: Compare each tensor's measured mean and std with what
            its scheme's arguments imply, within ``tolerance`` standard errors.
        scale: Flag random weights of linear maps whose std is more than
            ``scale_range[1]`` times above or ``1 / scale_range[0]`` times
            below sqrt(2 / fan_in), or whose mean exceeds their std.
        bounds: Flag bounded draws (uniform, truncated normal) with values
            outside their bounds, or more values on a bound than rounding
            explains.
        ties: Check that tied tensors are still one tensor after init.
        tolerance: Width of the statistics check, in standard errors of the
            measured mean and std for the tensor's number of elements.
        scale_range: ``[low, high]`` multiples of sqrt(2 / fan_in) that the
            scale check accepts.
        growth_limit: A forward-pass probe flags a family of repeated layers
            whose output std changes by more than this factor across depth.
    """

    model_config = ConfigDict(
        extra="forbid", frozen=True, strict=True, allow_inf_nan=False
    )

    enabled: bool = True
    on_failure: Literal["raise", "warn"] = "raise"
    finite: bool = True
    statistics: bool = True
    scale: bool = True
    bounds: bool = True
    ties: bool = True
    tolerance: float = Field(default=6.0, gt=0.0)
    scale_range: list[float] = [0.01, 3.0]
    growth_limit: float = Field(default=10.0, gt=1.0)

    @field_validator("scale_range")
    @classmethod
    def _scale_range(cls, value: list[float]) -> list[float]:
        checked = _check_range(value, "scale_range")
        assert checked is not None
        if checked[0] <= 0:
            raise ValueError(f"scale_range bounds must be positive, got {value}")
        return checked


class Rule(_Strict):
    """One rule: which tensors it selects and how it initializes them.

    Attributes:
        name: Optional label shown in reports and errors.
        match: The predicates that select tensors.
        init: The scheme and its arguments.
        zero_padding_idx: After a random scheme on an embedding with a
            ``padding_idx``, set that row to zero (as ``nn.Embedding`` does).
        checks: Switches for this rule's tensors that override the policy's
            ``checks`` section.
        expect: Bounds this rule's tensors must meet; a rule with ``expect``
            is exempt from the plausible-scale check.
        lint_ignore: Lint codes silenced on this rule, each with the reason.
    """

    model_config = ConfigDict(
        extra="forbid", frozen=True, strict=True, arbitrary_types_allowed=True
    )

    name: str | None = None
    match: Match
    init: InitSpec
    zero_padding_idx: bool = True
    checks: RuleChecks = RuleChecks()
    expect: Expect | None = None
    lint_ignore: dict[str, str | None] = {}

    _location: SourceLocation | None = PrivateAttr(default=None)

    @field_validator("init", mode="before")
    @classmethod
    def _init_lax(cls, value: Any) -> Any:
        # Strict mode would reject the YAML forms (a string or a mapping).
        return InitSpec.model_validate(value)

    @property
    def location(self) -> SourceLocation | None:
        """Where the rule starts in its policy file, if it came from one."""
        return self._location

    def label(self, index: int, *, with_location: bool = True) -> str:
        """Return a readable reference to this rule, the ``index``-th (0-based)."""
        name = f" {self.name!r}" if self.name else ""
        where = f" at {self._location}" if self._location and with_location else ""
        return f"rule {index + 1}{name}{where}"


class Policy(_Strict):
    """A validated policy: options and an ordered list of rules.

    Attributes:
        version: Format version; only 1 exists.
        name: Optional policy name shown in reports.
        description: Free text.
        on_unmatched: What to do with parameters that no rule matches:
            ``error`` (raise before writing), ``warn`` or ``keep``.
        extends: Policy files this one builds on, relative to it; their
            rules follow this file's, which therefore take precedence.
        rules: Rules in priority order: the first whose predicates hold wins.
        vars: Numbers that argument expressions may use by name;
            ``apply(..., vars=...)`` overrides them.
        checks: Which checks run on the initialized tensors, and what a
            failure does.
        lint_ignore: Lint codes silenced for the whole file, each with the reason.
    """

    version: Literal[1] = 1
    name: str | None = None
    description: str | None = None
    on_unmatched: Literal["error", "warn", "keep"] = "error"
    extends: list[str] = []
    rules: list[Rule] = []
    vars: dict[str, float] = {}
    checks: Checks = Checks()
    lint_ignore: dict[str, str | None] = {}

    _path: str = PrivateAttr(default="<text>")

    @model_validator(mode="before")
    @classmethod
    def _rules_required(cls, data: Any) -> Any:
        # `rules` may be left out only by a file that extends others. Unknown
        # keys are reported first (a misspelled `rules` is the likely cause).
        if not isinstance(data, dict) or set(data) - set(cls.model_fields):
            return data
        if "rules" not in data and not data.get("extends"):
            raise ValidationError.from_exception_data(
                "Policy", [{"type": "missing", "loc": ("rules",), "input": data}]
            )
        return data

    @field_validator("extends", mode="before")
    @classmethod
    def _one_or_many_files(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("vars")
    @classmethod
    def _var_names(cls, value: dict[str, float]) -> dict[str, float]:
        for name in value:
            if not name.isidentifier() or name.startswith("_"):
                raise ValueError(
                    f"invalid var name {name!r}: expected an identifier that does "
                    "not start with '_'"
                )
            if name in RESERVED_NAMES:
                raise ValueError(
                    f"invalid var name {name!r}: it is reserved in expressions"
                )
            if not math.isfinite(value[name]):
                raise ValueError(f"var {name!r} must be a finite number")
        return value

    @property
    def path(self) -> str:
        """The file the policy was loaded from, or ``"<text>"``."""
        return self._path


def policy_json_schema() -> dict[str, Any]:
    """Return the JSON Schema of a policy file, for editors and validators."""
    schema = Policy.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "initrules policy"
    # A file without rules must extend another one.
    schema["anyOf"] = [{"required": ["rules"]}, {"required": ["extends"]}]
    _describe_from_docstring(schema, Policy)
    for name, model in (
        ("Match", Match),
        ("Rule", Rule),
        ("Checks", Checks),
        ("RuleChecks", RuleChecks),
        ("Expect", Expect),
    ):
        _describe_from_docstring(schema["$defs"][name], model)
    # `extends` also takes one file name.
    extends = schema["properties"]["extends"]
    schema["properties"]["extends"] = {
        "anyOf": [{"type": "string"}, {"type": "array", "items": extends["items"]}],
        "default": extends["default"],
        "description": extends["description"],
    }
    match_properties = schema["$defs"]["Match"]["properties"]
    for field_name in ("module", "within", "ndim", "dtype"):
        # YAML accepts one value or a list of them.
        listed = match_properties[field_name]["anyOf"][0]
        match_properties[field_name]["anyOf"].insert(0, listed["items"])
    return schema


def _describe_from_docstring(schema: dict[str, Any], model: type[BaseModel]) -> None:
    """Use the summary and the ``Attributes:`` entries of a model's docstring."""
    doc = inspect.cleandoc(model.__doc__ or "")
    summary, _, rest = doc.partition("\n\n")
    schema["description"] = summary.replace("\n", " ")
    _, _, attributes = rest.partition("Attributes:\n")
    current: str | None = None
    descriptions: dict[str, list[str]] = {}
    for line in attributes.splitlines():
        field_name, colon, text = line.strip().partition(": ")
        if line.startswith("    ") and not line.startswith("     ") and colon:
            current = field_name
            descriptions[current] = [text]
        elif current is not None and line.strip():
            descriptions[current].append(line.strip())
    for field_name, words in descriptions.items():
        schema["properties"][field_name]["description"] = " ".join(words)
        schema["properties"][field_name].pop("title", None)
