"""Run a model once on example inputs and record every leaf module's output.

``probe`` hooks each leaf module (a module without child modules), runs one
forward pass in eval mode without autograd, and returns a ``ProbeReport`` with
one record per call in execution order. The report flags the first module
whose output contains NaN or Inf, and families of repeated layers whose output
standard deviation grows or shrinks by more than ``growth_limit`` from the
first layer to the last. Those are the usual signs of an initialization that is
finite but wrong, for example a deep ReLU stack drawn at twice Kaiming's std.

The model is left as it was: hooks are removed, each module's ``training``
flag and every buffer's values are restored, and so is torch's global random
number generator state, also when the forward raises.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from initrules.forward import first_floating_tensor, preserved
from initrules.planner import walk_modules
from initrules.report import json_number

__all__ = [
    "DEFAULT_GROWTH_LIMIT",
    "ProbeFlag",
    "ProbeRecord",
    "ProbeReport",
    "probe",
]

logger = logging.getLogger(__name__)

DEFAULT_GROWTH_LIMIT: float = 10.0
"""Default factor by which a family's output std may change before a flag."""

# A family needs this many records before its first-to-last ratio means
# anything: two layers are a pair, not a trend.
_MIN_FAMILY_SIZE = 3
_INDEX_SEGMENT = re.compile(r"^\d+$")


@dataclass(frozen=True)
class ProbeRecord:
    """Output statistics of one call of one leaf module.

    Attributes:
        index: Position of the call in execution order, 0-based.
        name: Canonical module name with wrapper segments removed, or ``""``
            for the root module.
        module_type: Class name of the module.
        mean: Mean of the output in float32, or None when the output contains
            no floating-point tensor with elements.
        std: Standard deviation of the output in float32 (Bessel-corrected,
            0.0 for a single element), or None as for ``mean``.
        max_abs: Largest absolute value of the output in float32, or None as
            for ``mean``.
        finite: False when the output contains NaN or Inf.
        numel: Number of elements of the tensor the statistics describe; 0
            when there is none.
        has_parameters: Whether the module owns parameters directly.
    """

    index: int
    name: str
    module_type: str
    mean: float | None
    std: float | None
    max_abs: float | None
    finite: bool
    numel: int
    has_parameters: bool


@dataclass(frozen=True)
class ProbeFlag:
    """A problem the probe found in the recorded outputs.

    Attributes:
        kind: ``nonfinite`` for the first output containing NaN or Inf,
            ``growth`` or ``shrink`` for a family of layers whose output std
            changes by more than the growth limit.
        module: Name of the module the flag is about: the non-finite module,
            or the family's last module.
        message: One sentence with the module names and the numbers.
    """

    kind: Literal["nonfinite", "growth", "shrink"]
    module: str
    message: str


@dataclass
class ProbeReport:
    """Records of one probe run, with flags computed from them.

    Attributes:
        records: One record per leaf module call, in execution order.
        growth_limit: Largest factor by which a family's output std may grow
            (or shrink, as its inverse) from its first record to its last
            before a flag is raised. Must be greater than 1; ``math.inf``
            turns the growth and shrink flags off.
    """

    records: list[ProbeRecord]
    growth_limit: float = DEFAULT_GROWTH_LIMIT

    def __post_init__(self) -> None:
        # NaN fails this comparison too, as it should.
        if not self.growth_limit > 1:
            raise ValueError(
                f"growth_limit must be greater than 1, got {self.growth_limit!r}"
            )

    @property
    def first_nonfinite(self) -> str | None:
        """Name of the first record in execution order whose output is not finite.

        None when every output is finite. The root module's name is ``""``,
        so compare the result with None rather than testing its truth.
        """
        for record in self.records:
            if not record.finite:
                return record.name
        return None

    @property
    def flags(self) -> list[ProbeFlag]:
        """The non-finite flag first, then growth and shrink flags by family."""
        flags: list[ProbeFlag] = []
        for record in self.records:
            if not record.finite:
                flags.append(_nonfinite_flag(record))
                break
        for key, family in _families(self.records).items():
            flag = _family_flag(key, family, self.growth_limit)
            if flag is not None:
                flags.append(flag)
        return flags

    @property
    def ok(self) -> bool:
        """True when the report has no flags."""
        return not self.flags

    def to_dict(self) -> dict[str, Any]:
        """Return the report as JSON-serializable data.

        Non-finite numbers become the strings ``"nan"``, ``"inf"`` and
        ``"-inf"``, since strict JSON has no such numbers.
        """
        records = []
        for record in self.records:
            data = asdict(record)
            for key in ("mean", "std", "max_abs"):
                data[key] = json_number(data[key])
            records.append(data)
        return {
            "growth_limit": json_number(self.growth_limit),
            "ok": self.ok,
            "first_nonfinite": self.first_nonfinite,
            "records": records,
            "flags": [asdict(flag) for flag in self.flags],
        }

    def __str__(self) -> str:
        return _format_report(self)


def probe(
    model: nn.Module, /, *example_args: Any, **example_kwargs: Any
) -> ProbeReport:
    """Run ``model(*example_args, **example_kwargs)`` once and record leaf outputs.

    The forward pass runs under ``torch.no_grad()`` with every module in eval
    mode. Only leaf modules are hooked, so work done in a parent's own
    ``forward`` (a residual sum, a functional softmax) shows up in the next
    leaf that consumes it. For outputs that are tuples, lists, dicts or
    transformers ``ModelOutput`` objects, the statistics describe the first
    floating-point tensor among their direct items.

    Afterwards, even when the forward raises, the probe removes every hook it
    added and sets each module's ``training`` flag back to its own earlier
    value. Every buffer is put back as the same tensor object with its earlier
    values. Torch's CPU random number generator state is restored, and so are
    the CUDA generators' states when CUDA was initialized before the call.

    NOTE: on a ``torch.compile`` model, torch 2.13's dynamo traces the hooks,
    breaks the graph at each statistic and recompiles, which takes tens of
    seconds even for a small MLP. Probing ``model._orig_mod`` instead records
    the same module names without compiling.

    Args:
        model: The model to run. It is positional-only, so a forward that
            takes a keyword argument named ``model`` still gets it.
        *example_args: Positional inputs for the model's forward.
        **example_kwargs: Keyword inputs for the model's forward.

    Returns:
        The records, with the default growth limit. Build a new
        ``ProbeReport(report.records, growth_limit=...)`` for another limit.

    Raises:
        TypeError: ``model`` is not a ``torch.nn.Module``.
        Exception: Whatever the model's forward raises, unchanged.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    records: list[ProbeRecord] = []
    handles: list[RemovableHandle] = []
    try:
        with preserved(model):
            for name, module in _leaf_modules(model):
                hook = _make_hook(name, _has_parameters(module), records)
                handles.append(module.register_forward_hook(hook))
            model(*example_args, **example_kwargs)
    finally:
        for handle in handles:
            handle.remove()
    logger.debug("probe recorded %d leaf module outputs", len(records))
    return ProbeReport(records)


def _leaf_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yield each distinct leaf module once, under its first canonical name."""
    seen: set[int] = set()
    for prefix, module, _ in walk_modules(model):
        if id(module) in seen:
            continue
        seen.add(id(module))
        if next(module.children(), None) is None:
            yield ".".join(prefix), module


def _has_parameters(module: nn.Module) -> bool:
    return next(module.parameters(recurse=False), None) is not None


_ForwardHook = Callable[[nn.Module, tuple[Any, ...], Any], None]


def _make_hook(
    name: str, has_parameters: bool, records: list[ProbeRecord]
) -> _ForwardHook:
    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        tensor = first_floating_tensor(output)
        mean, std, max_abs, finite, numel = _statistics(tensor)
        records.append(
            ProbeRecord(
                index=len(records),
                name=name,
                module_type=type(module).__name__,
                mean=mean,
                std=std,
                max_abs=max_abs,
                finite=finite,
                numel=numel,
                has_parameters=has_parameters,
            )
        )

    return hook


def _statistics(
    tensor: torch.Tensor | None,
) -> tuple[float | None, float | None, float | None, bool, int]:
    if tensor is None or tensor.numel() == 0:
        return None, None, None, True, 0
    original = tensor.detach()
    # Finiteness is judged in the output's own dtype, because a float64 value
    # beyond float32's range is finite even though its float32 statistics are not.
    finite = bool(torch.isfinite(original).all())
    values = original.to(torch.float32)
    numel = values.numel()
    mean = values.mean().item()
    std = values.std().item() if numel > 1 else 0.0
    max_abs = values.abs().max().item()
    return mean, std, max_abs, finite, numel


def _family_key(record: ProbeRecord) -> tuple[str, str]:
    segments = [
        "*" if _INDEX_SEGMENT.match(segment) else segment
        for segment in record.name.split(".")
    ]
    return ".".join(segments), record.module_type


_Family = list[tuple[ProbeRecord, float]]


def _families(records: list[ProbeRecord]) -> dict[tuple[str, str], _Family]:
    """Group finite records of parameterized modules by name pattern and type.

    The name pattern replaces every all-digit segment with ``*``, so the
    layers of a ``Sequential`` or a ``ModuleList`` form one family. Each
    record comes with its std.
    """
    families: dict[tuple[str, str], _Family] = {}
    for record in records:
        if not record.has_parameters or record.std is None or not record.finite:
            continue
        families.setdefault(_family_key(record), []).append((record, record.std))
    return families


def _family_flag(
    key: tuple[str, str], family: _Family, limit: float
) -> ProbeFlag | None:
    if len(family) < _MIN_FAMILY_SIZE:
        return None
    (first, first_std), (last, last_std) = family[0], family[-1]
    if first_std == last_std:
        # Includes a family that is dead (std 0) from its first layer on,
        # which has no trend to report.
        return None
    # A std of 0 at either end is an unbounded change, not a division error.
    ratio = last_std / first_std if first_std > 0 else math.inf
    pattern, module_type = key
    span = (
        f"from {_display_name(first.name)} ({first_std:.2g}) "
        f"to {_display_name(last.name)} ({last_std:.2g}), "
        f"beyond the limit of {limit:g}x"
    )
    if ratio > limit:
        return ProbeFlag(
            kind="growth",
            module=last.name,
            message=(
                f"output std of {module_type} modules {_display_name(pattern)} "
                f"grows {_growth_factor(ratio)} {span}"
            ),
        )
    if ratio < 1 / limit:
        return ProbeFlag(
            kind="shrink",
            module=last.name,
            message=(
                f"output std of {module_type} modules {_display_name(pattern)} "
                f"shrinks {_shrink_factor(ratio)} {span}"
            ),
        )
    return None


def _growth_factor(ratio: float) -> str:
    return "without bound" if math.isinf(ratio) else f"{ratio:.2g}x"


def _shrink_factor(ratio: float) -> str:
    return "to zero" if ratio == 0 else f"{1 / ratio:.2g}x"


def _nonfinite_flag(record: ProbeRecord) -> ProbeFlag:
    return ProbeFlag(
        kind="nonfinite",
        module=record.name,
        message=(
            f"{_display_name(record.name)} ({record.module_type}) is the first "
            "module in execution order whose output contains NaN or Inf"
        ),
    )


def _display_name(name: str) -> str:
    return repr(name) if name else "the root module"


def _format_number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _format_report(report: ProbeReport) -> str:
    header = ("#", "module", "type", "mean", "std", "max |x|", "finite", "numel")
    lines: list[tuple[str, ...]] = [header]
    for record in report.records:
        lines.append(
            (
                str(record.index),
                record.name or "(root)",
                record.module_type,
                _format_number(record.mean),
                _format_number(record.std),
                _format_number(record.max_abs),
                "yes" if record.finite else "NO",
                f"{record.numel:,}",
            )
        )
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    table = [
        "  ".join(
            cell.ljust(width) for cell, width in zip(line, widths, strict=True)
        ).rstrip()
        for line in lines
    ]
    flags = report.flags
    parts = [
        f"initrules probe: {len(report.records)} leaf module outputs, "
        f"{len(flags)} flag(s), growth limit {report.growth_limit:g}x",
        *table,
    ]
    parts.extend(f"{flag.kind}: {flag.message}" for flag in flags)
    return "\n".join(parts)
