"""Init schemes: a registry by name, each with a Pydantic model of its arguments.

The schemes of ``torch.nn.init`` keep torch's argument names and defaults.
``variance_scaling`` and ``lecun_normal`` follow JAX's definitions, with fans
computed by torch's convention (dim 0 is fan_out, dim 1 fan_in, both times
the receptive field). ``keep`` leaves a tensor as it is; ``default`` re-runs
the owning module's ``reset_parameters()``.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, overload

import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails
from torch import nn

from initrules.stream import Draw

logger = logging.getLogger(__name__)

__all__ = [
    "FillContext",
    "Scheme",
    "SchemeArgs",
    "compute_fans",
    "fans_of",
    "get_scheme",
    "register_scheme",
    "scheme_names",
]

Nonlinearity = Literal[
    "linear",
    "conv1d",
    "conv2d",
    "conv3d",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
    "sigmoid",
    "tanh",
    "relu",
    "leaky_relu",
    "selu",
]

# Normal draws are treated as reaching this many standard deviations when
# checking that a tensor's dtype can hold them (P(|z| > 6) is about 2e-9).
_NORMAL_REACH = 6.0

# Standard deviation of a standard normal truncated to [-2, 2], which JAX's
# variance_scaling divides by so that the truncated draw keeps its variance.
TRUNCATED_NORMAL_STD = 0.87962566103423978


class SchemeArgs(BaseModel):
    """Base class of scheme argument models: strict, frozen, no unknown keys."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, strict=True, allow_inf_nan=False
    )


@dataclass(frozen=True)
class FillContext:
    """Context of one fill: what a scheme may use besides tensor and arguments.

    Attributes:
        module: The module that owns the tensor.
        local_name: The tensor's attribute name on ``module`` (``weight``).
        generator: The generator to draw from, or ``None`` for torch's global one.
        seed: The tensor's derived seed when the run is seeded, else ``None``.
        source: Reads the values to copy, for schemes that copy them from
            elsewhere (``pretrained``); ``None`` for the others.
    """

    module: nn.Module
    local_name: str
    generator: torch.Generator | None
    seed: int | None
    source: Callable[[], torch.Tensor] | None = None


FillFn = Callable[[torch.Tensor, SchemeArgs, FillContext], None]
ArgsCheck = Callable[[tuple[int, ...], torch.dtype, "SchemeArgs"], "str | None"]
MaxAbs = Callable[[tuple[int, ...], "SchemeArgs"], float]
DrawFn = Callable[[tuple[int, ...], "SchemeArgs"], Draw]


@dataclass(frozen=True)
class Scheme:
    """An init scheme: its name, argument model, fill function and needs.

    Attributes:
        name: Registry name used in policies.
        args_model: Pydantic model of the scheme's arguments.
        fill: Writes the scheme's values into a tensor in place.
        random: True if the values are drawn at random (needs a float dtype).
        min_ndim: Minimum number of dimensions of the tensor.
        max_ndim: Maximum number of dimensions of the tensor, or ``None``.
        needs_module_reset: True if the owning module must define
            ``reset_parameters`` (the ``default`` scheme).
        writes: False for schemes that leave the tensor as it is (``keep``).
        check_args: Returns why the arguments cannot fill a tensor of this
            shape and dtype, or ``None``; run at plan time.
        max_abs: Returns the largest magnitude the scheme writes for a shape
            (for normal draws, six standard deviations past the mean), so that
            values the dtype cannot hold are rejected before writing.
        needs_data: True if the engine finishes the scheme with forward passes
            over a batch of data after every other tensor is written (``lsuv``).
        draw: Returns the elementwise distribution the scheme draws from for
            a shape, for schemes whose elements are independent draws. With
            a seed, the engine samples it itself instead of calling ``fill``
            (large tensors in chunks, tensors on parallel threads; see
            :mod:`initrules.stream`), so ``fill`` must sample it too.
        constant: True if the scheme sets every element to one value that
            does not depend on the shape, so a shard can be filled alone.
    """

    name: str
    args_model: type[SchemeArgs]
    fill: FillFn
    random: bool
    min_ndim: int = 0
    max_ndim: int | None = None
    needs_module_reset: bool = False
    writes: bool = True
    check_args: ArgsCheck | None = None
    max_abs: MaxAbs | None = None
    needs_data: bool = False
    draw: DrawFn | None = None
    constant: bool = False

    def check(
        self, shape: tuple[int, ...], dtype: torch.dtype, args: SchemeArgs | None = None
    ) -> str | None:
        """Return why this scheme cannot fill a tensor, or ``None`` if it can."""
        ndim = len(shape)
        if ndim < self.min_ndim or (self.max_ndim is not None and ndim > self.max_ndim):
            return f"{self.name} needs {self._ndim_text()}, got {ndim}-D"
        needs_float = self.random or self.name in ("eye", "dirac")
        if needs_float and not dtype.is_floating_point:
            return (
                f"{self.name} needs a real floating-point tensor, got "
                f"{_dtype_name(dtype)}"
            )
        if args is None:
            return None
        if self.check_args is not None:
            reason = self.check_args(shape, dtype, args)
            if reason is not None:
                return reason
        return self._check_range(shape, dtype, args)

    def _check_range(
        self, shape: tuple[int, ...], dtype: torch.dtype, args: SchemeArgs
    ) -> str | None:
        if self.max_abs is None or not dtype.is_floating_point:
            return None
        reach = self.max_abs(shape, args)
        limit = torch.finfo(dtype).max
        if math.isfinite(reach) and reach <= limit:
            return None
        return (
            f"{self.name} with these arguments writes values up to about {reach:.3g}, "
            f"beyond the largest {_dtype_name(dtype)} value ({limit:.3g})"
        )

    def _ndim_text(self) -> str:
        if self.max_ndim == self.min_ndim:
            return f"a {self.min_ndim}-D tensor"
        if self.max_ndim is None:
            return f"a tensor with at least {self.min_ndim} dimensions"
        return f"a {self.min_ndim}-D to {self.max_ndim}-D tensor"


_REGISTRY: dict[str, Scheme] = {}


@overload
def register_scheme(scheme: Scheme, *, override: bool = False) -> Scheme: ...


@overload
def register_scheme(
    scheme: str,
    *,
    args: type[SchemeArgs] | None = None,
    random: bool = True,
    min_ndim: int = 0,
    max_ndim: int | None = None,
    override: bool = False,
) -> Callable[[FillFn], FillFn]: ...


def register_scheme(
    scheme: Scheme | str,
    *,
    args: type[SchemeArgs] | None = None,
    random: bool = True,
    min_ndim: int = 0,
    max_ndim: int | None = None,
    override: bool = False,
) -> Scheme | Callable[[FillFn], FillFn]:
    """Add a scheme to the registry; an existing name needs ``override=True``.

    Give a :class:`Scheme`, or use it as a decorator on a fill function::

        class ScaledArgs(initrules.SchemeArgs):
            scale: float = 1.0

        @initrules.register_scheme("scaled_ones", args=ScaledArgs, random=False)
        def scaled_ones(tensor, args, context):
            tensor.fill_(args.scale)

    A policy then uses ``init: {scheme: scaled_ones, scale: 0.5}``, and the
    arguments are validated by ``args`` (no arguments when it is ``None``)
    and appear in :func:`initrules.policy_json_schema`. Packages register
    schemes on import of a module named by an entry point in the
    ``initrules.schemes`` group, loaded the first time a scheme is looked up.

    Raises:
        ValueError: The name is registered already and ``override`` is False,
            or it is not an identifier.
        TypeError: ``args`` is not a subclass of :class:`SchemeArgs`.
    """
    if isinstance(scheme, Scheme):
        return _add(scheme, override)
    name = scheme
    if name in _REGISTRY and not override:
        raise ValueError(_already_registered(name))
    if args is not None and not (
        isinstance(args, type) and issubclass(args, SchemeArgs)
    ):
        raise TypeError(
            f"the arguments of scheme {name!r} must be a subclass of "
            f"initrules.SchemeArgs, got {args!r}"
        )

    def decorate(fill: FillFn) -> FillFn:
        model = args if args is not None else NoArgs
        _add(
            Scheme(
                name, model, fill, random=random, min_ndim=min_ndim, max_ndim=max_ndim
            ),
            override,
        )
        return fill

    return decorate


def _already_registered(name: str) -> str:
    return f"scheme {name!r} is already registered; pass override=True to replace it"


def _add(scheme: Scheme, override: bool) -> Scheme:
    if not isinstance(scheme.name, str) or not scheme.name.isidentifier():
        raise ValueError(
            f"invalid scheme name {scheme.name!r}: expected an identifier, such as "
            "scaled_normal"
        )
    model = scheme.args_model
    if not (isinstance(model, type) and issubclass(model, SchemeArgs)):
        raise TypeError(
            f"the arguments of scheme {scheme.name!r} must be a subclass of "
            f"initrules.SchemeArgs, got {model!r}"
        )
    if scheme.name in _REGISTRY and not override:
        raise ValueError(_already_registered(scheme.name))
    _REGISTRY[scheme.name] = scheme
    return scheme


_ENTRY_POINT_GROUP = "initrules.schemes"
_entry_points_loaded = False


def _load_entry_points() -> None:
    """Import the modules that packages expose in the ``initrules.schemes`` group.

    A module that fails to import is logged and skipped, so that one broken
    package does not stop policies that do not use its schemes.
    """
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for entry_point in importlib.metadata.entry_points(group=_ENTRY_POINT_GROUP):
        try:
            entry_point.load()
        except Exception as error:
            logger.warning(
                "failed to load initrules scheme plugin %r (%s): %s: %s",
                entry_point.name,
                entry_point.value,
                type(error).__name__,
                error,
            )


def get_scheme(name: str) -> Scheme:
    """Return the registered scheme called ``name``.

    Raises:
        KeyError: No scheme has that name; the message lists the valid names.
    """
    _load_entry_points()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"unknown scheme {name!r}; valid schemes: {', '.join(scheme_names())}"
        ) from None


def scheme_names() -> list[str]:
    """Return the registered scheme names, sorted."""
    _load_entry_points()
    return sorted(_REGISTRY)


def compute_fans(shape: tuple[int, ...]) -> tuple[int, int]:
    """Return ``(fan_in, fan_out)`` by torch's convention for a 2-D or larger shape."""
    receptive_field = math.prod(shape[2:]) if len(shape) > 2 else 1
    return shape[1] * receptive_field, shape[0] * receptive_field


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _in_float32(fill: FillFn) -> FillFn:
    """Run ``fill`` on a float32 copy for dtypes narrower than float32."""

    def wrapped(tensor: torch.Tensor, args: SchemeArgs, ctx: FillContext) -> None:
        # float16, bfloat16 and the float8 types: draw in float32, round once.
        if tensor.dtype.itemsize >= 4:
            fill(tensor, args, ctx)
            return
        scratch = torch.empty(tensor.shape, dtype=torch.float32, device=tensor.device)
        fill(scratch, args, ctx)
        tensor.copy_(scratch)

    return wrapped


# --- torch.nn.init schemes -------------------------------------------------


class NoArgs(SchemeArgs):
    """Arguments of a scheme that takes none."""


class UniformArgs(SchemeArgs):
    """Arguments of ``uniform``: values drawn from U(a, b)."""

    a: float = 0.0
    b: float = 1.0

    @model_validator(mode="after")
    def _ordered(self) -> UniformArgs:
        if self.a > self.b:
            raise ValueError(f"a ({self.a}) must not be greater than b ({self.b})")
        return self


class NormalArgs(SchemeArgs):
    """Arguments of ``normal``: values drawn from N(mean, std**2)."""

    mean: float = 0.0
    std: float = Field(1.0, ge=0.0)


class TruncNormalArgs(SchemeArgs):
    """Arguments of ``trunc_normal``; ``a`` and ``b`` are absolute bounds."""

    mean: float = 0.0
    std: float = Field(1.0, gt=0.0)
    a: float = -2.0
    b: float = 2.0

    @model_validator(mode="after")
    def _ordered(self) -> TruncNormalArgs:
        if self.a >= self.b:
            raise ValueError(f"a ({self.a}) must be less than b ({self.b})")
        return self


class ConstantArgs(SchemeArgs):
    """Arguments of ``constant``: every element set to ``val``."""

    val: float


class DiracArgs(SchemeArgs):
    """Arguments of ``dirac``: the identity of a convolution with ``groups``."""

    groups: int = Field(1, ge=1)


class GainArgs(SchemeArgs):
    """Arguments of ``orthogonal``: the scale of the orthonormal rows or columns."""

    gain: float = 1.0


class FanArgs(SchemeArgs):
    """Arguments that every scheme scaled by fans takes.

    Attributes:
        fans: ``torch`` reads the fans from the shape, as ``torch.nn.init``
            does; ``module`` uses the owning module's true fans (see
            :mod:`initrules.fans`), which the planner resolves into
            ``fan_in`` and ``fan_out`` for each tensor.
        fan_in: Explicit fan_in, which replaces the one the shape gives.
        fan_out: Explicit fan_out, which replaces the one the shape gives.
    """

    fans: Literal["torch", "module"] = "torch"
    fan_in: int | None = Field(None, ge=1)
    fan_out: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _one_source(self) -> FanArgs:
        if self.fans == "module" and (self.fan_in or self.fan_out):
            raise ValueError(
                "give either fans: module or explicit fan_in/fan_out, not both"
            )
        return self


def fans_of(shape: tuple[int, ...], args: SchemeArgs) -> tuple[int, int]:
    """Return the ``(fan_in, fan_out)`` a fan-scaled scheme uses for ``shape``."""
    fan_in, fan_out = compute_fans(shape)
    if isinstance(args, FanArgs):
        return args.fan_in or fan_in, args.fan_out or fan_out
    return fan_in, fan_out


class XavierArgs(FanArgs):
    """Arguments of the Xavier (Glorot) schemes, as in ``torch.nn.init``."""

    gain: float = 1.0


class KaimingArgs(FanArgs):
    """Arguments of the Kaiming (He) schemes, as in ``torch.nn.init``."""

    a: float = 0.0
    mode: Literal["fan_in", "fan_out"] = "fan_in"
    nonlinearity: Nonlinearity = "leaky_relu"


class SparseArgs(SchemeArgs):
    """Arguments of ``sparse``: the fraction of each column set to zero."""

    sparsity: float = Field(ge=0.0, le=1.0)
    std: float = Field(0.01, ge=0.0)


class VarianceScalingArgs(FanArgs):
    """Arguments of ``variance_scaling``, with JAX's meaning.

    The target variance is ``scale / n``, where ``n`` is fan_in, fan_out or
    their mean. A truncated normal is cut at two standard deviations and
    rescaled so that the draw keeps that variance.
    """

    scale: float = Field(1.0, gt=0.0)
    mode: Literal["fan_in", "fan_out", "fan_avg"] = "fan_in"
    distribution: Literal["truncated_normal", "normal", "uniform"] = "truncated_normal"


def _fill_constant(tensor: torch.Tensor, args: SchemeArgs, ctx: FillContext) -> None:
    assert isinstance(args, ConstantArgs)
    tensor.fill_(args.val)


def _fill_ones(tensor: torch.Tensor, args: SchemeArgs, ctx: FillContext) -> None:
    tensor.fill_(1)


def _fill_zeros(tensor: torch.Tensor, args: SchemeArgs, ctx: FillContext) -> None:
    tensor.zero_()


def _fill_eye(tensor: torch.Tensor, args: SchemeArgs, ctx: FillContext) -> None:
    nn.init.eye_(tensor)


def _fill_dirac(tensor: torch.Tensor, args: SchemeArgs, ctx: FillContext) -> None:
    assert isinstance(args, DiracArgs)
    nn.init.dirac_(tensor, args.groups)


def _fill_orthogonal(tensor: torch.Tensor, args: SchemeArgs, ctx: FillContext) -> None:
    assert isinstance(args, GainArgs)
    # LAPACK's QR rounds differently on different thread counts, so a seeded
    # draw runs it on one thread to give the same bits everywhere.
    # NOTE: torch's thread count is global to the process for that time.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        nn.init.orthogonal_(tensor, args.gain, generator=ctx.generator)
    finally:
        torch.set_num_threads(threads)


def _fill_sparse(tensor: torch.Tensor, args: SchemeArgs, ctx: FillContext) -> None:
    """Draw as ``torch.nn.init.sparse_`` does, with every draw from ``ctx.generator``.

    torch's own version draws the zero positions from the global generator
    even when given one, so a seeded run would not repeat.
    """
    assert isinstance(args, SparseArgs)
    rows, columns = tensor.shape
    zeros = math.ceil(args.sparsity * rows)
    tensor.normal_(0, args.std, generator=ctx.generator)
    for column in range(columns):
        order = torch.randperm(rows, generator=ctx.generator, device=tensor.device)
        tensor[order[:zeros], column] = 0


class LecunNormalArgs(FanArgs):
    """Arguments of ``lecun_normal``: variance 1/fan_in, truncated normal."""


LECUN_ARGS = VarianceScalingArgs(
    scale=1.0, mode="fan_in", distribution="truncated_normal"
)


def _fill_keep(tensor: torch.Tensor, args: SchemeArgs, ctx: FillContext) -> None:
    return None


def _fill_default(tensor: torch.Tensor, args: SchemeArgs, ctx: FillContext) -> None:
    """Re-run the module's ``reset_parameters`` and keep only this tensor's values.

    Every other tensor of the module and of its children is saved and
    restored, since some ``reset_parameters`` also reset child modules.
    """
    module = ctx.module
    others = [
        (value, value.detach().clone())
        for value in [*module.parameters(), *module.buffers()]
        if value is not tensor
    ]
    # getattr, because nn.Module.__getattr__ is typed to return tensors.
    reset: Callable[[], object] = getattr(module, "reset_parameters")  # noqa: B009
    if ctx.seed is None:
        reset()
    else:
        with _seeded_global_generators(tensor.device, ctx.seed):
            reset()
    for value, saved in others:
        value.copy_(saved)
    replaced = getattr(module, ctx.local_name)
    if replaced is not tensor:
        # reset_parameters() assigned a new tensor; keep the original object
        # (optimizers and tied modules hold it) and give it the new values.
        tensor.copy_(replaced)
        setattr(module, ctx.local_name, tensor)


@contextlib.contextmanager
def _seeded_global_generators(device: torch.device, seed: int) -> Iterator[None]:
    """Seed the global generator of ``device`` (and the CPU's), then restore them."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


def _check_dirac(
    shape: tuple[int, ...], dtype: torch.dtype, args: SchemeArgs
) -> str | None:
    assert isinstance(args, DiracArgs)
    if shape[0] % args.groups:
        return (
            f"dirac needs dim 0 ({shape[0]}) to be divisible by groups ({args.groups})"
        )
    return None


def _check_constant(
    shape: tuple[int, ...], dtype: torch.dtype, args: SchemeArgs
) -> str | None:
    assert isinstance(args, ConstantArgs)
    if dtype.is_floating_point or dtype.is_complex:
        limit = torch.finfo(dtype).max
        if abs(args.val) > limit:
            return (
                f"constant {args.val} is beyond the largest {_dtype_name(dtype)} value"
            )
        real = dtype.to_real() if dtype.is_complex else dtype
        stored = float(torch.tensor(args.val, dtype=torch.float64).to(real))
        if args.val != 0 and stored == 0:
            return f"constant {args.val} rounds to 0 in {_dtype_name(dtype)}"
        return None
    if dtype == torch.bool:
        if args.val not in (0.0, 1.0):
            return f"constant {args.val} is not a bool value (0 or 1)"
        return None
    info = torch.iinfo(dtype)
    if not float(args.val).is_integer() or not info.min <= args.val <= info.max:
        return f"constant {args.val} cannot be stored in {_dtype_name(dtype)}"
    return None


def _max_abs_by_draw(draw: DrawFn) -> MaxAbs:
    """Return the largest magnitude of the distribution ``draw`` gives."""

    def max_abs(shape: tuple[int, ...], args: SchemeArgs) -> float:
        chosen = draw(shape, args)
        if chosen.kind == "uniform":
            # torch draws b - a and scales it, so the span must be finite too.
            return max(
                abs(chosen.first), abs(chosen.second), chosen.second - chosen.first
            )
        reach = abs(chosen.first) + _NORMAL_REACH * abs(chosen.second)
        if chosen.kind == "trunc_normal":
            return max(abs(chosen.low), abs(chosen.high), reach)
        return reach

    return max_abs


def _max_abs_sparse(shape: tuple[int, ...], args: SchemeArgs) -> float:
    assert isinstance(args, SparseArgs)
    return _NORMAL_REACH * args.std


def _max_abs_orthogonal(shape: tuple[int, ...], args: SchemeArgs) -> float:
    assert isinstance(args, GainArgs)
    return abs(args.gain)


def _argument_problem(item: ErrorDetails) -> str:
    key = ".".join(map(str, item["loc"])) or "arguments"
    if item["type"] == "extra_forbidden":
        return f"unknown key {key!r}"
    return f"{key!r}: {item['msg']}"


def _resolve_lsuv_base(base: str | dict[str, Any]) -> tuple[Scheme, SchemeArgs]:
    """Return the scheme and validated arguments that ``base`` names.

    Errors name ``base`` and list the base scheme's own arguments, not lsuv's.
    """
    spec = {"scheme": base} if isinstance(base, str) else dict(base)
    name = spec.pop("scheme", None)
    if not isinstance(name, str):
        raise ValueError("base needs a 'scheme' name, such as orthogonal")
    _load_entry_points()
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown base scheme {name!r}; valid schemes: {', '.join(scheme_names())}"
        )
    scheme = _REGISTRY[name]
    if scheme.needs_data or not scheme.writes or scheme.needs_module_reset:
        raise ValueError(
            f"base scheme {name!r} cannot start an lsuv draw; use a scheme that "
            "draws values itself, such as orthogonal or normal"
        )
    try:
        args = scheme.args_model.model_validate(spec)
    except ValidationError as error:
        problems = "; ".join(_argument_problem(item) for item in error.errors())
        valid = ", ".join(scheme.args_model.model_fields) or "none"
        raise ValueError(
            f"invalid arguments of base scheme {name!r} ({problems}); its "
            f"arguments are: {valid}"
        ) from None
    return scheme, args


class LsuvArgs(SchemeArgs):
    """Arguments of ``lsuv`` (layer-sequential unit-variance init).

    The weight is first drawn by the ``base`` scheme; then, with a batch of
    data, it is rescaled until its module's output std is within ``tol`` of
    ``target_std``, making at most ``max_iter`` forward passes.

    Attributes:
        base: The scheme of the first draw: a name (``orthogonal``) or a
            mapping with ``scheme`` and its arguments.
        target_std: The output standard deviation to reach.
        tol: Accepted distance of the output std from ``target_std``.
        max_iter: Most forward passes for one weight.
    """

    base: str | dict[str, Any] = "orthogonal"
    target_std: float = Field(1.0, gt=0.0)
    tol: float = Field(0.1, gt=0.0)
    max_iter: int = Field(10, ge=1)

    _base_scheme: Scheme = PrivateAttr()
    _base_args: SchemeArgs = PrivateAttr()

    @field_validator("base")
    @classmethod
    def _valid_base(cls, base: str | dict[str, Any]) -> str | dict[str, Any]:
        # Validated here so that errors point at 'base', not at the whole init.
        _resolve_lsuv_base(base)
        return base

    @model_validator(mode="after")
    def _resolve_base(self) -> LsuvArgs:
        scheme, args = _resolve_lsuv_base(self.base)
        self._base_scheme = scheme
        self._base_args = args
        return self

    @property
    def base_scheme(self) -> Scheme:
        """The resolved scheme of the first draw."""
        return self._base_scheme

    @property
    def base_args(self) -> SchemeArgs:
        """The validated arguments of the first draw."""
        return self._base_args


def _fill_lsuv(tensor: torch.Tensor, args: SchemeArgs, ctx: FillContext) -> None:
    # Only the first draw; the engine rescales with data afterwards.
    assert isinstance(args, LsuvArgs)
    args.base_scheme.fill(tensor, args.base_args, ctx)


def _check_lsuv(
    shape: tuple[int, ...], dtype: torch.dtype, args: SchemeArgs
) -> str | None:
    assert isinstance(args, LsuvArgs)
    reason = args.base_scheme.check(shape, dtype, args.base_args)
    return None if reason is None else f"its base scheme cannot: {reason}"


# --- elementwise draws, for the chunked stream --------------------------------
# Each returns the distribution the matching fill above draws from, computed
# as torch.nn.init computes it.


def _draw_uniform(shape: tuple[int, ...], args: SchemeArgs) -> Draw:
    assert isinstance(args, UniformArgs)
    return Draw("uniform", args.a, args.b)


def _draw_normal(shape: tuple[int, ...], args: SchemeArgs) -> Draw:
    assert isinstance(args, NormalArgs)
    return Draw("normal", args.mean, args.std)


def _draw_trunc_normal(shape: tuple[int, ...], args: SchemeArgs) -> Draw:
    assert isinstance(args, TruncNormalArgs)
    return Draw("trunc_normal", args.mean, args.std, args.a, args.b)


def _centered_draw(std: float, *, uniform: bool) -> Draw:
    if uniform:
        bound = math.sqrt(3.0) * std
        return Draw("uniform", -bound, bound)
    return Draw("normal", 0.0, std)


def _draw_xavier(uniform: bool) -> DrawFn:
    def draw(shape: tuple[int, ...], args: SchemeArgs) -> Draw:
        assert isinstance(args, XavierArgs)
        fan_in, fan_out = fans_of(shape, args)
        std = args.gain * math.sqrt(2.0 / float(max(1, fan_in + fan_out)))
        return _centered_draw(std, uniform=uniform)

    return draw


def _draw_kaiming(uniform: bool) -> DrawFn:
    def draw(shape: tuple[int, ...], args: SchemeArgs) -> Draw:
        assert isinstance(args, KaimingArgs)
        fan_in, fan_out = fans_of(shape, args)
        fan = fan_in if args.mode == "fan_in" else fan_out
        gain = nn.init.calculate_gain(args.nonlinearity, args.a)
        return _centered_draw(gain / math.sqrt(max(1, fan)), uniform=uniform)

    return draw


def _draw_variance_scaling(shape: tuple[int, ...], args: SchemeArgs) -> Draw:
    assert isinstance(args, VarianceScalingArgs)
    fan_in, fan_out = fans_of(shape, args)
    fans = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}
    variance = args.scale / max(1.0, fans[args.mode])
    if args.distribution == "truncated_normal":
        std = math.sqrt(variance) / TRUNCATED_NORMAL_STD
        return Draw("trunc_normal", 0.0, std, -2 * std, 2 * std)
    if args.distribution == "normal":
        return Draw("normal", 0.0, math.sqrt(variance))
    limit = math.sqrt(3.0 * variance)
    return Draw("uniform", -limit, limit)


def _draw_lecun_normal(shape: tuple[int, ...], args: SchemeArgs) -> Draw:
    assert isinstance(args, LecunNormalArgs)
    if args.fan_in is None and args.fan_out is None:
        return _draw_variance_scaling(shape, LECUN_ARGS)
    explicit = LECUN_ARGS.model_copy(
        update={"fan_in": args.fan_in, "fan_out": args.fan_out}
    )
    return _draw_variance_scaling(shape, explicit)


def _sampled(draw: DrawFn) -> FillFn:
    """Return a fill that samples the distribution ``draw`` gives, elementwise."""

    def fill(tensor: torch.Tensor, args: SchemeArgs, ctx: FillContext) -> None:
        draw(tuple(tensor.shape), args).sample_(tensor, ctx.generator)

    return fill


def _by_draw(
    name: str, args_model: type[SchemeArgs], draw: DrawFn, *, min_ndim: int = 0
) -> Scheme:
    """Return a random scheme defined by its elementwise distribution."""
    return Scheme(
        name,
        args_model,
        _in_float32(_sampled(draw)),
        random=True,
        min_ndim=min_ndim,
        max_abs=_max_abs_by_draw(draw),
        draw=draw,
    )


def _register_builtins() -> None:
    builtins = [
        _by_draw("uniform", UniformArgs, _draw_uniform),
        _by_draw("normal", NormalArgs, _draw_normal),
        _by_draw("trunc_normal", TruncNormalArgs, _draw_trunc_normal),
        Scheme(
            "constant",
            ConstantArgs,
            _fill_constant,
            random=False,
            check_args=_check_constant,
            constant=True,
        ),
        Scheme("ones", NoArgs, _fill_ones, random=False, constant=True),
        Scheme("zeros", NoArgs, _fill_zeros, random=False, constant=True),
        Scheme("eye", NoArgs, _fill_eye, random=False, min_ndim=2, max_ndim=2),
        Scheme(
            "dirac",
            DiracArgs,
            _fill_dirac,
            random=False,
            min_ndim=3,
            max_ndim=5,
            check_args=_check_dirac,
        ),
        _by_draw("xavier_uniform", XavierArgs, _draw_xavier(uniform=True), min_ndim=2),
        _by_draw("xavier_normal", XavierArgs, _draw_xavier(uniform=False), min_ndim=2),
        _by_draw(
            "kaiming_uniform", KaimingArgs, _draw_kaiming(uniform=True), min_ndim=2
        ),
        _by_draw(
            "kaiming_normal", KaimingArgs, _draw_kaiming(uniform=False), min_ndim=2
        ),
        Scheme(
            "orthogonal",
            GainArgs,
            _in_float32(_fill_orthogonal),
            random=True,
            min_ndim=2,
            max_abs=_max_abs_orthogonal,
        ),
        Scheme(
            "sparse",
            SparseArgs,
            _in_float32(_fill_sparse),
            random=True,
            min_ndim=2,
            max_ndim=2,
            max_abs=_max_abs_sparse,
        ),
        _by_draw(
            "variance_scaling", VarianceScalingArgs, _draw_variance_scaling, min_ndim=2
        ),
        _by_draw("lecun_normal", LecunNormalArgs, _draw_lecun_normal, min_ndim=2),
        Scheme("keep", NoArgs, _fill_keep, random=False, writes=False),
        Scheme("default", NoArgs, _fill_default, random=True, needs_module_reset=True),
        Scheme(
            "lsuv",
            LsuvArgs,
            _fill_lsuv,
            random=True,
            min_ndim=2,
            check_args=_check_lsuv,
            needs_data=True,
        ),
    ]
    for scheme in builtins:
        register_scheme(scheme)


_register_builtins()
