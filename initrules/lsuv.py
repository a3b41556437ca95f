"""The data-dependent pass of ``lsuv`` (Mishkin and Matas, 2015).

After every static scheme has written its tensor, each ``lsuv`` weight is
rescaled in forward order, earliest module first, until the output std of
its module on the batch is within ``tol`` of ``target_std``. A forward pass
stops as soon as the module being tuned has produced its output, so tuning
an early layer does not pay for the rest of the network.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from torch import nn

from initrules.forward import call_model, first_floating_tensor, preserved
from initrules.planner import Plan, PlannedTensor, walk_modules
from initrules.report import CheckFailure, LsuvResult
from initrules.schemes import LsuvArgs

__all__ = ["lsuv_failures", "run_lsuv"]

logger = logging.getLogger(__name__)


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the output is captured."""


def _forward_order(
    model: nn.Module, items: list[PlannedTensor], data: Any
) -> list[int]:
    """Return the indices of ``items`` in the order their modules first run."""
    order: list[int] = []
    handles = []
    by_module: dict[int, list[int]] = {}
    for index, item in enumerate(items):
        by_module.setdefault(id(item.entry.module), []).append(index)

    def record(module: nn.Module, inputs: Any, output: Any) -> None:
        for index in by_module.get(id(module), []):
            if index not in order:
                order.append(index)

    seen: set[int] = set()
    for item in items:
        module = item.entry.module
        if id(module) not in seen:
            seen.add(id(module))
            handles.append(module.register_forward_hook(record))
    try:
        call_model(model, data)
    finally:
        for handle in handles:
            handle.remove()
    missing = [index for index in range(len(items)) if index not in order]
    return order + missing


def _output_std(model: nn.Module, module: nn.Module, data: Any) -> float | None:
    """Run the model until ``module`` has produced its output; return its std."""
    captured: list[float] = []

    def capture(_: nn.Module, inputs: Any, output: Any) -> None:
        tensor = first_floating_tensor(output)
        if tensor is not None and tensor.numel() > 1:
            captured.append(float(tensor.detach().float().std()))
        raise _Stop

    handle = module.register_forward_hook(capture)
    try:
        call_model(model, data)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured[0] if captured else None


def _module_names(model: nn.Module) -> dict[int, str]:
    names: dict[int, str] = {}
    for prefix, module, _ in walk_modules(model):
        names.setdefault(id(module), ".".join(prefix))
    return names


def run_lsuv(model: nn.Module, plan: Plan, data: Any) -> list[LsuvResult]:
    """Rescale every ``lsuv`` weight of the plan with forward passes over ``data``.

    Runs in eval mode under ``torch.no_grad()``; module modes, buffers and
    the global random state are restored afterwards.

    Returns:
        One result per weight, in forward order. A module that never runs
        on ``data`` gets zero iterations and is not converged.
    """
    items = [item for item in plan.planned if item.scheme.needs_data]
    names = _module_names(model)
    results: list[LsuvResult] = []
    with preserved(model):
        for index in _forward_order(model, items, data):
            item = items[index]
            args = item.args
            assert isinstance(args, LsuvArgs)
            results.append(_tune(model, item, args, data, names))
    return results


# A rescaling must bring the output std at least this much closer to the
# target, in log scale, or the weight is not what sets the output's scale.
_MIN_PROGRESS = 0.1


def _tune(
    model: nn.Module,
    item: PlannedTensor,
    args: LsuvArgs,
    data: Any,
    names: dict[int, str],
) -> LsuvResult:
    module = item.entry.module
    weight = item.entry.tensor
    base = weight.detach().clone()
    std: float | None = None
    reason = "max_iter"
    distance = math.inf
    iterations = 0
    for iterations in range(1, args.max_iter + 1):
        std = _output_std(model, module, data)
        if std is None:
            reason = "no output"
            iterations = 0
            break
        if not math.isfinite(std) or std == 0:
            reason = "not finite" if not math.isfinite(std) else "zero"
            break
        if abs(std - args.target_std) <= args.tol:
            reason = ""
            break
        previous, distance = distance, abs(math.log(std / args.target_std))
        if distance > (1 - _MIN_PROGRESS) * previous:
            reason = "stalled"
            break
        if iterations < args.max_iter:
            weight.mul_(args.target_std / std)
    if reason:
        # A run that cannot converge leaves extreme scales, so keep the base draw.
        weight.copy_(base)
    logger.debug(
        "lsuv %s: output std %s after %d pass(es)", item.entry.name, std, iterations
    )
    return LsuvResult(
        name=item.entry.name,
        module=names.get(id(module), ""),
        iterations=iterations,
        output_std=std if std is not None else math.nan,
        converged=not reason,
        reason=reason,
    )


def lsuv_failures(results: list[LsuvResult]) -> list[CheckFailure]:
    """Return a failure for each weight whose module output missed its target."""
    failures = []
    for result in results:
        if result.converged:
            continue
        module = repr(result.module) if result.module else "the root module"
        std = f"{result.output_std:.4g}"
        texts = {
            "no output": (
                f"{module} produced no floating-point output with at least 2 "
                "elements on the data (it did not run, returned no floating-point "
                "tensor, or the batch is too small), so lsuv could not measure it"
            ),
            "not finite": (
                f"output std of {module} is {std}, which no rescaling can fix; check "
                "the data and the base draw for NaN or Inf"
            ),
            "zero": (
                f"output of {module} is constant, which no rescaling can fix; check "
                "the data and the base draw"
            ),
            "stalled": (
                f"output std of {module} stays near {std} however the weight is "
                "scaled (a saturating activation or a large bias sets it), so lsuv "
                "cannot reach the target"
            ),
            "max_iter": (
                f"output std of {module} is {std} after {result.iterations} "
                "pass(es), not within tol of the target; raise max_iter"
            ),
        }
        text = texts[result.reason] + "; the weight keeps its base draw"
        failures.append(
            CheckFailure(
                check="lsuv",
                tensor=result.name,
                message=f"lsuv: {result.name!r}: {text}",
                measured=result.output_std,
            )
        )
    return failures
