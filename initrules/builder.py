"""Build a model with its parameters on the meta device, then initialize it once.

A normal construction runs every module's default ``reset_parameters`` (and a
transformers model's own init) before a policy overwrites the values again.
:func:`build` skips that work: while the factory runs, every parameter a
module registers is moved to the meta device, so its default init touches no
memory. Buffers stay where the module's own code computed them (rotary
frequency tables, position ids, BatchNorm statistics), so they come out
equal to a normal construction without initrules knowing how each model
computes them. The parameters are then allocated on the target device and
written once by the policy.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.parameter import UninitializedParameter

from initrules.engine import PolicySource, apply, resolve_policy
from initrules.errors import InitRulesError, PlanError, UnmatchedTensorsError
from initrules.planner import Plan, make_plan
from initrules.report import Report
from initrules.schema import Policy
from initrules.sharded import agree_on_plan

__all__ = ["build", "parameters_on_meta"]

logger = logging.getLogger(__name__)


# The patch of nn.Module.register_parameter is installed while at least one
# thread is inside parameters_on_meta(), and it acts only in those threads.
_local = threading.local()
_install_lock = threading.Lock()
_install_count = 0
# Kept after the patch is removed, for a call that read the patched method
# just before another thread removed it.
_saved_register: Callable[..., None] = nn.Module.register_parameter


def _register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
    _saved_register(module, name, param)
    moved: dict[int, tuple[nn.Parameter, nn.Parameter]] | None = getattr(
        _local, "moved", None
    )
    if moved is None or param is None or param.is_meta:
        return
    if isinstance(param, UninitializedParameter):
        # A lazy module's parameter has no shape yet; the plan reports it.
        return
    # One Parameter registered on several modules stays one Parameter. The
    # original is kept in the map so that its id cannot be reused.
    found = moved.get(id(param))
    if found is None:
        on_meta = type(param)(
            param.detach().to("meta"), requires_grad=param.requires_grad
        )
        found = moved[id(param)] = (param, on_meta)
    module._parameters[name] = found[1]


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Move every parameter registered inside the block to the meta device.

    Buffers are left alone. ``nn.Module.register_parameter`` is patched while
    any thread is inside such a block, but the patch moves parameters only
    in threads that are; blocks may nest and may overlap across threads.
    """
    global _install_count, _saved_register
    with _install_lock:
        if _install_count == 0:
            _saved_register = nn.Module.register_parameter
            nn.Module.register_parameter = _register_on_meta  # type: ignore[method-assign,assignment]
        _install_count += 1
    outer = getattr(_local, "moved", None)
    _local.moved = {} if outer is None else outer
    try:
        yield
    finally:
        _local.moved = outer
        with _install_lock:
            _install_count -= 1
            if _install_count == 0:
                nn.Module.register_parameter = _saved_register  # type: ignore[method-assign]


def _materialize(
    model: nn.Module, device: torch.device, dtype: torch.dtype | None
) -> None:
    """Allocate every meta parameter on ``device`` and move buffers there.

    Tied parameters stay tied: each distinct parameter is allocated once.
    Floating-point buffers take ``dtype`` as ``model.to(dtype)`` would.
    """
    allocated: dict[int, nn.Parameter] = {}
    moved: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is None:
                continue
            replacement = allocated.get(id(param))
            if replacement is None:
                target = (
                    dtype if dtype is not None and param.is_floating_point() else None
                )
                data = torch.empty_like(param, device=device, dtype=target)
                replacement = type(param)(data, requires_grad=param.requires_grad)
                allocated[id(param)] = replacement
            module._parameters[name] = replacement
        for name, buffer in module._buffers.items():
            if buffer is None:
                continue
            converted = moved.get(id(buffer))
            if converted is None:
                target = (
                    dtype if dtype is not None and buffer.is_floating_point() else None
                )
                converted = buffer.to(device=device, dtype=target)
                moved[id(buffer)] = converted
            module._buffers[name] = converted


def _materialize_sharded(model: nn.Module, device: torch.device) -> None:
    """Allocate a parallelized model with ``to_empty`` and restore its buffers.

    FSDP2 and DTensor layouts expect ``to_empty``, in which FSDP2 updates its
    own references to the sharded parameters. It also leaves buffers
    uninitialized, so they get back the values the factory computed, which
    stayed real while the parameters were on meta.
    """
    saved = {
        name: buffer.detach().clone()
        for name, buffer in model.named_buffers(remove_duplicate=False)
        if not buffer.is_meta
    }
    model.to_empty(device=device)
    restored = dict(model.named_buffers(remove_duplicate=False))
    with torch.no_grad():
        for name, value in saved.items():
            restored[name].copy_(value)


def build(
    factory: Callable[[], nn.Module],
    policy: PolicySource,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    seed: int | None = None,
    parallelize: Callable[[nn.Module], object] | None = None,
    **apply_options: Any,
) -> tuple[nn.Module, Report]:
    """Construct a model without default init, then initialize it by ``policy``.

    The factory runs with every parameter moved to the meta device as it is
    registered, so no default init touches memory. Parameters are then
    allocated on ``device`` and written once through the policy; buffers
    keep the values the modules' own code computed. With the same seed, the
    weights equal those of :func:`apply` on a normally constructed model.

    Args:
        factory: Called with no arguments; returns the model. Use
            ``functools.partial`` or a lambda to pass arguments.
        policy: A policy file path or a :class:`Policy`.
        device: Where the parameters are allocated.
        dtype: Floating-point dtype of parameters and buffers, as
            ``model.to(dtype)`` would give; ``None`` keeps the factory's.
        seed: Seed of the per-tensor generators, as for :func:`apply`.
        parallelize: Called with the model while its parameters are still on
            the meta device, to shard it (``fully_shard`` per block, or
            DTensor placements); the model is then materialized with
            ``to_empty``, its buffers get back the values the factory
            computed, and each rank writes its shards (see
            :mod:`initrules.sharded`). A seed is then required.
        **apply_options: Passed to :func:`apply` (``probe_inputs``, ``data``,
            ``vars``).

    Returns:
        The model and the report of its initialization.

    Raises:
        UnmatchedTensorsError: A parameter matched no rule, whatever the
            policy's ``on_unmatched`` sets, since its memory would hold
            garbage. Raised before any memory is allocated.
        PlanError: A rule keeps a parameter as it is (``keep``), which would
            leave it uninitialized, a buffer was left on the meta device, or
            a lazy module has no shapes yet.
        PolicyError, CheckError: As for :func:`apply`.
    """
    resolved = resolve_policy(policy)
    partial = sorted({"only", "skip_loaded"} & apply_options.keys())
    if partial:
        raise TypeError(
            f"build does not take {' or '.join(partial)}: it allocates every "
            "parameter without values, so each one must be initialized; build the "
            "model, load the checkpoint, then call apply with it"
        )
    if torch.device(device).type == "meta":
        raise ValueError(
            "build allocates the parameters on a real device, not 'meta'; to plan "
            "or lint without memory, construct under torch.device('meta') and use "
            "initrules.make_plan(..., allow_meta=True) or initrules lint"
        )
    with parameters_on_meta():
        model = factory()
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"factory must return a torch.nn.Module, got {type(model).__name__}"
        )
    if parallelize is not None:
        if dtype is not None:
            model.to(dtype)
        parallelize(model)
        # A plan that fails on one rank must fail on all, not leave the
        # others waiting in apply's collectives.
        try:
            plan, error = _check_plan(model, resolved, apply_options.get("vars")), None
        except InitRulesError as caught:
            plan, error = None, caught
        agree_on_plan(plan, error, seed)
        if error is not None:
            raise error
        _materialize_sharded(model, torch.device(device))
    else:
        _check_plan(model, resolved, apply_options.get("vars"))
        _materialize(model, torch.device(device), dtype)
    strict = resolved.model_copy(update={"on_unmatched": "error"})
    report = apply(model, strict, seed=seed, **apply_options)
    logger.info("built %s on %s and initialized it once", type(model).__name__, device)
    return model, report


def _check_plan(
    model: nn.Module, policy: Policy, variables: Mapping[str, float] | None
) -> Plan:
    """Reject what would leave memory uninitialized, before allocating any."""
    plan = make_plan(model, policy, allow_meta=True, variables=variables)
    if plan.lazy:
        raise PlanError(
            f"{len(plan.lazy)} tensor(s) of lazy modules are not materialized "
            f"(first: {plan.lazy[0]!r}), and build cannot run a forward pass to "
            "give them a shape; construct the model with shapes, or materialize it "
            "with a forward pass and use apply"
        )
    if plan.unmatched:
        raise UnmatchedTensorsError(
            [entry.name for entry in plan.unmatched],
            policy.path,
            fix=(
                "build allocates parameters without values, so every parameter "
                "needs a rule, whatever 'on_unmatched' says."
            ),
        )
    kept = [
        item
        for item in plan.planned
        if not item.scheme.writes and item.entry.info.kind == "parameter"
    ]
    if kept:
        item = kept[0]
        rule = item.match.rule
        raise PlanError(
            f"{rule.label(item.match.rule_index)} keeps {item.entry.name!r} as it "
            f"is, but build allocates parameters without values ({len(kept)} "
            "tensor(s) in all); give them a scheme that writes, or construct the "
            "model normally and use apply"
        )
    meta_buffers = [name for name, buffer in model.named_buffers() if buffer.is_meta]
    if meta_buffers:
        raise PlanError(
            f"{len(meta_buffers)} buffer(s) were created on the meta device by the "
            f"factory (first: {meta_buffers[0]!r}), so build cannot give them "
            "values; construct them on a real device in the factory"
        )
    return plan
