"""Apply a policy to a model: plan everything, then write under ``no_grad``."""

from __future__ import annotations

import difflib
import logging
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from initrules.checks import (
    MEASURED_ALONE,
    ChunkSums,
    Expectations,
    Measured,
    Switches,
    measure,
    measure_many,
    plan_failures,
    reads_values,
    switches_for,
    tensor_failures,
    tie_failures,
)
from initrules.errors import (
    ApplyError,
    CheckError,
    InitRulesError,
    InitRulesWarning,
    PlanError,
    UnmatchedTensorsError,
)
from initrules.expected import ExpectedStats
from initrules.loader import load_policy
from initrules.lsuv import lsuv_failures, run_lsuv
from initrules.planner import (
    Plan,
    PlannedTensor,
    SkippedTensor,
    TensorEntry,
    make_plan,
)
from initrules.probing import probe
from initrules.report import CheckFailure, Report, Row, Skipped
from initrules.schema import Checks, Policy
from initrules.schemes import FillContext
from initrules.sharded import (
    agree_on_failure,
    agree_on_plan,
    fill_sharded,
    global_view,
    has_process_group,
    is_plain,
    is_sharded,
    measure_sharded,
    on_tensor,
    rank,
)
from initrules.stream import (
    CHUNK_ELEMENTS,
    Draw,
    DrawJob,
    DrawJobError,
    derive_seed,
    draw_all,
    fill_chunked,
)

__all__ = ["PolicySource", "apply", "check", "derive_seed", "resolve_policy"]

logger = logging.getLogger(__name__)

PolicySource = str | os.PathLike[str] | Policy


def resolve_policy(policy: PolicySource) -> Policy:
    """Return ``policy`` itself, or load it when given a path.

    Raises:
        TypeError: ``policy`` is neither a path nor a Policy.
        PolicyError: The file cannot be read or is invalid.
    """
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, (str, os.PathLike)):
        return load_policy(policy)
    raise TypeError(
        f"policy must be a path or an initrules.Policy, got {type(policy).__name__}; "
        "to use YAML text, pass initrules.load_policy(text=...)"
    )


def apply(
    model: nn.Module,
    policy: PolicySource,
    *,
    seed: int | None = None,
    probe_inputs: Any = None,
    data: Any = None,
    vars: Mapping[str, float] | None = None,
    only: Iterable[str] | None = None,
    skip_loaded: Any = None,
) -> Report:
    """Initialize the tensors of ``model`` by ``policy``, check them, return the report.

    Every tensor's rule is resolved and every scheme checked against its
    tensor before anything is written, so an error leaves the model as it
    was. Parameters keep their identity and ``requires_grad``; tied tensors
    are written once. The policy's ``checks`` then run on the written values
    (see :mod:`initrules.checks`); checks that the rules' arguments alone
    fail run before writing, so such a policy writes nothing.

    Args:
        model: The model to initialize, materialized (not on the meta device).
        policy: A policy file path or a :class:`Policy`.
        seed: When given, each tensor draws from its own generators seeded
            from ``seed`` and its canonical name; large tensors are drawn in
            chunks on several threads with the same result (see
            :mod:`initrules.stream`). When ``None``, draws come from torch's
            global generator (``torch.manual_seed``).
        probe_inputs: Example inputs for a forward-pass probe after init
            (see :func:`initrules.probe`): a tuple of positional arguments, a
            dict of keyword arguments, or one tensor.
        data: A batch for data-dependent schemes (``lsuv``), in the same
            forms as ``probe_inputs``; needed only when the policy uses one.
        vars: Values that override the policy's ``vars`` in argument
            expressions, such as ``{"n_layer": 24}``.
        only: Initialize only the tensors with these canonical names (or
            aliases); the others are listed as skipped.
        skip_loaded: The result of ``model.load_state_dict(..., strict=False)``
            (anything with ``missing_keys``): only the missing tensors are
            initialized. A tensor tied to a loaded one counts as loaded.

    Returns:
        The report of what each tensor got and of every failed check.

    Raises:
        PolicyError: The policy is invalid.
        PlanError: A scheme cannot apply to a tensor, the model is on meta,
            or the policy needs ``data`` and none was given.
        UnmatchedTensorsError: Parameters matched no rule under
            ``on_unmatched: error``.
        CheckError: A check failed under ``checks: {on_failure: raise}``.
        ApplyError: A scheme failed while writing, or the model's forward
            failed on ``data`` or ``probe_inputs``; tensors were written.

    Example:
        >>> import torch, initrules
        >>> policy = initrules.load_policy(text='''
        ... rules:
        ...   - {match: {param: weight}, init: {scheme: xavier_uniform}}
        ...   - {match: {param: bias}, init: zeros}
        ... ''')
        >>> report = initrules.apply(torch.nn.Linear(4, 3), policy, seed=0)
        >>> report.summary["initialized"], report.ok
        (2, True)
    """
    _check_seed(seed)
    resolved = resolve_policy(policy)
    missing = _missing_names(skip_loaded) if skip_loaded is not None else None
    sharded = _sharded_model(model, writing=True)

    partial = only is not None or missing is not None

    def plan_and_vet() -> Plan:
        # With only or skip_loaded, tensors left out may not stop the plan.
        plan = make_plan(model, resolved, variables=vars, raise_problems=not partial)
        if partial:
            plan = _restrict(plan, only, missing)
            plan.raise_for_problems()
        _require_data(plan, data)
        if sharded:
            _vet_sharded(plan, seed)
        return plan

    plan = _agreed(plan_and_vet, seed) if sharded else plan_and_vet()
    # Every rank has the same plan now, so all raise or warn alike.
    _handle_unmatched(plan)
    report = _new_report(plan, seed)
    expectations = Expectations()
    report.failures += plan_failures(plan, expectations)
    if report.failures and resolved.checks.on_failure == "raise":
        # The arguments alone fail a check, so nothing is written.
        raise CheckError(report)
    zeroed: dict[int, int] = {}
    notes: dict[int, str] = {}
    # Statistics taken while tensors were drawn, by id of the plan item.
    fill_stats: dict[int, Measured] = {}
    failure: Exception | None = None
    with torch.no_grad():
        # Seeded elementwise draws share one thread pool across tensors, and
        # the loop below writes the rest.
        # NOTE: a custom scheme that reads other tensors of the model finds
        # these draws already written, whatever the module order.
        overlapping = set() if sharded else _overlapping(plan)
        pooled = {}
        if seed is not None and not sharded:
            pooled = _draw_pooled(plan, seed, fill_stats, overlapping)
        for written, group in enumerate(_by_tensor(plan.planned, sharded)):
            item = group[0]
            tensor = item.entry.tensor
            try:
                if sharded and is_sharded(tensor):
                    zeroed[id(tensor)] = fill_sharded(
                        group, seed, _fill, _padding_index
                    )
                elif id(item) in pooled:
                    zeroed[id(tensor)] = pooled[id(item)]
                else:
                    # A tensor that shares memory with another may be changed
                    # by a later write, so it is measured after all writes.
                    stats = None if id(item.entry) in overlapping else fill_stats
                    zeroed[id(tensor)] = _fill(item, seed, stats)
            except Exception as error:
                failure = _write_error(item, written, error)
                failure.__cause__ = error
                break
    if sharded:
        # One rank's failure must not leave the others in a collective.
        agree_on_failure(failure)
    elif failure is not None:
        raise failure
    with torch.no_grad():
        _write_parametrized(plan, notes)
    if any(item.scheme.needs_data for item in plan.planned):
        try:
            report.lsuv = run_lsuv(model, plan, data)
        except Exception as error:
            raise ApplyError(
                f"the forward pass over data failed: {type(error).__name__}: "
                f"{error}; the static schemes have written their tensors, so check "
                "that data fits the model's forward (shape, dtype, argument names)"
            ) from error
    _record_rows(report, plan, zeroed, notes, expectations, fill_stats)
    report.failures += tie_failures(plan, model)
    if resolved.checks.enabled:
        report.failures += lsuv_failures(report.lsuv)
    if probe_inputs is not None:
        _run_probe(report, model, probe_inputs, resolved.checks)
    logger.info(
        "initialized %d tensors with policy %s (%d unmatched, %d skipped, "
        "%d failed checks)",
        len(report.rows),
        report.policy_name,
        len(report.unmatched),
        len(report.skipped),
        len(report.failures),
    )
    _settle(report, resolved.checks.on_failure)
    return report


def check(
    model: nn.Module,
    policy: PolicySource,
    *,
    probe_inputs: Any = None,
    vars: Mapping[str, float] | None = None,
) -> Report:
    """Run the policy's checks on a model initialized elsewhere, writing nothing.

    Each tensor is judged against the rule that would win for it, exactly as
    :func:`apply` judges what it wrote, for example a model loaded from a
    checkpoint. Unmatched tensors are listed in the report, not raised.

    Args:
        model: The initialized model.
        policy: A policy file path or a :class:`Policy`.
        probe_inputs: Example inputs for a forward-pass probe, as for
            :func:`apply`.
        vars: Values that override the policy's ``vars``, as for :func:`apply`.

    Returns:
        The report, with ``failures`` listing every failed check; call
        :meth:`Report.raise_for_failures` to raise on them.

    Raises:
        PolicyError: The policy is invalid.
        PlanError: A scheme cannot apply to a tensor, or the model is on meta.
    """
    resolved = resolve_policy(policy)

    def plan_only() -> Plan:
        return make_plan(model, resolved, variables=vars)

    plan = _agreed(plan_only, None) if _sharded_model(model) else plan_only()
    report = _new_report(plan, None)
    report.failures += plan_failures(plan)
    _record_rows(report, plan, None, {}, judge_arguments=True)
    report.failures += tie_failures(plan, model)
    if probe_inputs is not None:
        _run_probe(report, model, probe_inputs, resolved.checks)
    return report


def _sharded_model(model: nn.Module, *, writing: bool = False) -> bool:
    """Return True if any parameter of ``model`` is a DTensor.

    With ``writing``, reject an FSDP2 model whose parameters are gathered
    whole right now: after a forward with ``reshard_after_forward=False``
    they are plain tensors that FSDP2 discards at its next reshard, so
    writes to them would be lost.
    """
    # A non-module is rejected by the planner, with its own message.
    if not isinstance(model, nn.Module):
        return False
    if not has_process_group():
        return False
    sharded = False
    # An explicit walk: named_modules() and parameters() cost microseconds
    # per module, which adds up on deep models. A name is kept as a pair
    # (parent's pair, segment) and spelled out only for an error.
    stack: list[tuple[Any, nn.Module]] = [((), model)]
    seen = {id(model)}
    while stack:
        name, module = stack.pop()
        if writing and isinstance(module, FSDPModule):
            _reject_unsharded_fsdp(_spelled(name) or type(module).__name__, module)
        for param in module._parameters.values():
            if isinstance(param, DTensor):
                sharded = True
        for child_name, child in module._modules.items():
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                stack.append(((name, child_name), child))
    return sharded


def _spelled(name: Any) -> str:
    """Return the dotted name that :func:`_sharded_model` keeps as nested pairs."""
    segments: list[str] = []
    while name:
        name, segment = name
        segments.append(segment)
    return ".".join(reversed(segments))


def _reject_unsharded_fsdp(name: str, module: nn.Module) -> None:
    """Raise a PlanError if any parameter of an FSDP2 module is unsharded."""
    if any(not is_sharded(param) for param in module.parameters()):
        raise PlanError(
            f"the FSDP2 module {name!r} has its parameters unsharded, and FSDP2 "
            "would discard what initrules writes there at its next reshard; call "
            "model.reshard() first"
        )


def _sharded_model_of(plan: Plan) -> bool:
    if not has_process_group():
        return False
    return any(is_sharded(item.entry.tensor) for item in plan.planned)


def _agreed(make: Callable[[], Plan], seed: int | None) -> Plan:
    """Plan on every rank and check that the ranks agree, before any writing.

    An error on one rank is shared with the others, so every rank raises
    instead of some waiting forever for a collective.
    """
    try:
        plan, error = make(), None
    except InitRulesError as caught:
        plan, error = None, caught
    agree_on_plan(plan, error, seed)
    if error is not None:
        raise error
    assert plan is not None
    return plan


def _vet_sharded(plan: Plan, seed: int | None) -> None:
    """Reject what cannot give the same values on every rank of a sharded model."""
    for item in plan.planned:
        tensor = item.entry.tensor
        if not is_sharded(tensor):
            continue
        rule = item.match.rule.label(item.match.rule_index)
        placements = getattr(tensor, "placements", ())
        if any(placement.is_partial() for placement in placements):
            raise PlanError(
                f"{rule} would write {item.entry.name!r}, whose placements "
                f"{tuple(placements)} hold partial sums; initialize it before it "
                "becomes Partial, or redistribute it to Shard or Replicate"
            )
        if not item.scheme.writes and not is_plain(tensor):
            raise PlanError(
                f"{rule} keeps part of {item.entry.name!r}, whose placements "
                f"{tuple(placements)} are not Shard(d) or Replicate(); initrules "
                "keeps values only under those"
            )
        if item.scheme.needs_module_reset or item.scheme.needs_data:
            raise PlanError(
                f"{rule} uses {item.scheme.name} on the sharded tensor "
                f"{item.entry.name!r}, which runs the module's own code on its "
                "shard; use a scheme that draws values"
            )
        if item.scheme.random and seed is None:
            raise PlanError(
                f"{rule} draws {item.entry.name!r} at random, and the tensor is "
                "sharded: without a seed each rank would draw from its own "
                "generator; pass apply(..., seed=N)"
            )


def _by_tensor(
    items: list[PlannedTensor], sharded: bool
) -> Iterator[list[PlannedTensor]]:
    """Yield the plan's items one by one, or, for a sharded model, per tensor."""
    if not sharded:
        for item in items:
            yield [item]
        return
    group: list[PlannedTensor] = []
    for item in items:
        if group and item.entry is not group[0].entry:
            yield group
            group = []
        group.append(item)
    if group:
        yield group


def _measure_shards(
    item: PlannedTensor,
    measured: Measured | None,
    expected: ExpectedStats | None,
    whole: dict[int, torch.Tensor],
) -> tuple[Measured | None, PlannedTensor]:
    """Return a sharded item's global statistics and the item the checks judge.

    The checks judge the whole tensor, gathered on every rank, only when they
    read its values (see :func:`initrules.checks.reads_values`); otherwise a
    meta tensor of the global shape replaces it.
    """
    tensor = item.entry.tensor
    reduced = item.chunk is None and is_plain(tensor)
    if reduced and not reads_values(item, measured, expected):
        stand_in = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
        return measured, on_tensor(item, stand_in)
    full = whole.get(id(tensor))
    if full is None:
        full = whole[id(tensor)] = global_view(tensor)
    judged = on_tensor(item, full)
    return measure(judged.target), judged


def _missing_names(skip_loaded: Any) -> set[str]:
    keys = getattr(skip_loaded, "missing_keys", None)
    if keys is None:
        raise TypeError(
            "skip_loaded must be the result of load_state_dict(strict=False), "
            f"with missing_keys; got {type(skip_loaded).__name__}"
        )
    return {_canonical_key(key) for key in keys}


def _restrict(plan: Plan, only: Iterable[str] | None, missing: set[str] | None) -> Plan:
    """Keep in the plan only the tensors the caller wants initialized.

    A tensor is wanted when one of its names is in ``only`` and, with
    ``missing`` names from a checkpoint, when every one of its names is
    missing (so a head tied to a loaded embedding counts as loaded).
    """
    requested = _requested(plan, only) if only is not None else None

    def reason_to_skip(entry: TensorEntry) -> str | None:
        names = [entry.name, *entry.aliases]
        if requested is not None and requested.isdisjoint(names):
            return "not in only"
        if (
            missing is not None
            and not all(name in missing for name in names)
            and not _never_saved(entry)
        ):
            return "loaded from the checkpoint"
        return None

    planned: list[PlannedTensor] = []
    skipped = list(plan.skipped)
    for item in plan.planned:
        reason = reason_to_skip(item.entry)
        if reason is None:
            planned.append(item)
        else:
            skipped.append(SkippedTensor(item.entry, reason, item.match))
    unmatched = []
    for entry in plan.unmatched:
        reason = reason_to_skip(entry)
        if reason is None:
            unmatched.append(entry)
        else:
            skipped.append(SkippedTensor(entry, reason))
    problems = [
        problem for problem in plan.problems if reason_to_skip(problem.entry) is None
    ]
    return replace(
        plan,
        planned=planned,
        unmatched=unmatched,
        skipped=skipped,
        problems=problems,
    )


def _requested(plan: Plan, only: Iterable[str]) -> set[str]:
    """Return the names in ``only``, each one a name of the model's tensors.

    Raises:
        TypeError: ``only`` is a single string.
        PlanError: A name is not a tensor of the model.
    """
    if isinstance(only, str):
        raise TypeError(
            f"only must be a collection of names, not the string {only!r}; "
            f"write only=[{only!r}]"
        )
    requested = set(only)
    entries = [item.entry for item in plan.planned] + plan.unmatched
    entries += [item.entry for item in plan.skipped]
    entries += [problem.entry for problem in plan.problems]
    known = {name for entry in entries for name in (entry.name, *entry.aliases)}
    known |= set(plan.untouched_buffers) | set(plan.lazy)
    unknown = sorted(requested - known)
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=3)
        hint = f" (close: {', '.join(close)})" if close else ""
        raise PlanError(
            f"only names {len(unknown)} tensor(s) the model does not have: "
            f"{', '.join(map(repr, unknown[:5]))}{hint}; use canonical names as "
            "the report shows them"
        )
    return requested


def _never_saved(entry: TensorEntry) -> bool:
    """Return True for a non-persistent buffer, which no checkpoint contains."""
    return entry.info.kind == "buffer" and entry.info.local_name in getattr(
        entry.module, "_non_persistent_buffers_set", ()
    )


def _canonical_key(key: str) -> str:
    """Remove wrapper segments from a state_dict key, as the planner does.

    NOTE: DDP's and DataParallel's ``module.`` segment is found by type in
    the planner and is not removed here, so load the checkpoint into the
    unwrapped model when using ``skip_loaded``.
    """
    segments = [
        segment
        for segment in key.split(".")
        if segment
        not in ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")
    ]
    # A parametrized tensor is stored as NAME.parametrizations.LOCAL.original*
    # and planned as NAME.LOCAL.
    if (
        len(segments) >= 3
        and segments[-3] == "parametrizations"
        and segments[-1].startswith("original")
    ):
        segments = [*segments[:-3], segments[-2]]
    return ".".join(segments)


def _check_seed(seed: object) -> None:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")


def _require_data(plan: Plan, data: Any) -> None:
    if data is not None:
        return
    for item in plan.planned:
        if item.scheme.needs_data:
            rule = item.match.rule
            raise PlanError(
                f"{rule.label(item.match.rule_index)} uses {item.scheme.name} on "
                f"{item.entry.name!r}, which needs a batch of data for its forward "
                "passes; pass apply(..., data=batch)"
            )


_LAZY_REASON = (
    "lazy module, not materialized yet; run one forward pass with example inputs, "
    "then apply the policy again"
)


def _new_report(plan: Plan, seed: int | None) -> Report:
    policy = plan.policy
    return Report(
        policy_name=policy.name or policy.path,
        policy_path=policy.path,
        seed=seed,
        unmatched=[entry.name for entry in plan.unmatched],
        skipped=[Skipped(item.entry.name, item.reason) for item in plan.skipped]
        + [Skipped(name, _LAZY_REASON) for name in plan.lazy],
        untouched_buffers=plan.untouched_buffers,
        checked=policy.checks.enabled,
    )


def _record_rows(
    report: Report,
    plan: Plan,
    zeroed: dict[int, int] | None,
    notes: dict[int, str],
    expectations: Expectations | None = None,
    fill_stats: dict[int, Measured] | None = None,
    *,
    judge_arguments: bool = False,
) -> None:
    """Measure every planned tensor, add its row and its failed checks.

    ``zeroed`` maps each written tensor to the rows zeroed after its draw;
    ``None`` means the model was initialized elsewhere, so the rows a policy
    would zero are assumed zeroed. ``notes`` maps entries (by ``id``) to a
    note for their rows.
    """
    checks = plan.policy.checks
    if expectations is None:
        expectations = Expectations()
    rules: dict[int, _RuleFacts] = {}
    whole: dict[int, torch.Tensor] = {}
    sharded = plan.planned and _sharded_model_of(plan)
    # Sharded tensors' statistics are reduced across ranks all at once.
    reduced: dict[int, Measured | None] = {}
    if sharded:
        shards = [
            (index, item.entry.tensor)
            for index, item in enumerate(plan.planned)
            if item.chunk is None
            and is_sharded(item.entry.tensor)
            and is_plain(item.entry.tensor)
        ]
        measures = measure_sharded([tensor for _, tensor in shards])
        reduced = {
            index: measured
            for (index, _), measured in zip(shards, measures, strict=True)
        }
    # Plain tensors are measured together, which matters on deep models with
    # thousands of small tensors.
    known = fill_stats or {}
    plain = [
        position
        for position, item in enumerate(plan.planned)
        if not (sharded and is_sharded(item.entry.tensor)) and id(item) not in known
    ]
    local: dict[int, Measured | None] = {
        position: known[id(item)]
        for position, item in enumerate(plan.planned)
        if id(item) in known
    }
    local.update(
        zip(plain, measure_many([plan.planned[i].target for i in plain]), strict=True)
    )
    for position, item in enumerate(plan.planned):
        if zeroed is None:
            zeroed_rows = 0 if _padding_index(item) is None else 1
        else:
            zeroed_rows = zeroed.get(id(item.entry.tensor), 0)
        facts = rules.get(item.match.rule_index)
        if facts is None:
            facts = rules[item.match.rule_index] = _RuleFacts.of(item, checks)
        expected = expectations.of(item, zeroed_rows)
        judged = item
        if sharded and is_sharded(item.entry.tensor):
            measured, judged = _measure_shards(
                item, reduced.get(position), expected, whole
            )
        else:
            measured = local[position]
        row = _row(item, measured, expected, zeroed_rows, facts)
        note = notes.get(id(item.entry))
        if note:
            row = replace(row, note="; ".join(filter(None, (row.note, note))))
        report.rows.append(row)
        if checks.enabled:
            found = tensor_failures(
                judged,
                measured,
                expected,
                checks,
                judge_arguments=judge_arguments,
                switches=facts.switches,
            )
            if found:
                _add_failures(report, found)


@dataclass(frozen=True)
class _RuleFacts:
    """Facts that every row of one rule shares, computed once per rule and run.

    Reading a Pydantic model's fields and private attributes costs
    microseconds each, which adds up over thousands of tensors.
    """

    name: str | None
    location: str | None
    args: dict[str, Any] | None  # None when expressions make them per tensor
    switches: Switches

    @classmethod
    def of(cls, item: PlannedTensor, checks: Checks) -> _RuleFacts:
        rule = item.match.rule
        location = rule.location
        return cls(
            name=rule.name,
            location=str(location) if location else None,
            args=None if rule.init.expressions else rule.init.args.model_dump(),
            switches=switches_for(checks, rule),
        )


def _add_failures(report: Report, failures: list[CheckFailure]) -> None:
    """Add failures, leaving out a check already failed for the same tensor.

    A rule whose arguments fail ``scale`` or ``expect`` before writing would
    otherwise fail again on the measured values.
    """
    known = {(failure.check, failure.tensor) for failure in report.failures}
    report.failures += [
        failure for failure in failures if (failure.check, failure.tensor) not in known
    ]


def _run_probe(report: Report, model: nn.Module, inputs: Any, checks: Checks) -> None:
    try:
        if isinstance(inputs, tuple):
            result = probe(model, *inputs)
        elif isinstance(inputs, dict):
            result = probe(model, **inputs)
        else:
            result = probe(model, inputs)
    except Exception as error:
        # The model's own forward failed on the inputs. The model's state was
        # restored, and the tensors keep what the policy wrote.
        raise ApplyError(
            f"the forward-pass probe failed: {type(error).__name__}: {error}; "
            "the tensors are initialized, so check that probe_inputs fit the "
            "model's forward (shape, dtype, argument names)"
        ) from error
    result.growth_limit = checks.growth_limit
    report.probe = result
    if checks.enabled:
        report.failures += [
            CheckFailure("probe", flag.module, f"probe: {flag.message}")
            for flag in result.flags
        ]


def _settle(report: Report, on_failure: str) -> None:
    """Raise or warn about the report's failures, as the policy's on_failure sets.

    In a distributed run every rank raises, and only rank 0 warns.
    """
    if not report.failures:
        return
    if on_failure == "raise":
        raise CheckError(report)
    if rank() != 0:
        return
    shown = "; ".join(failure.message for failure in report.failures[:5])
    more = len(report.failures) - 5
    warnings.warn(
        f"{len(report.failures)} check(s) failed for policy {report.policy_path}: "
        f"{shown}" + (f"; and {more} more" if more > 0 else ""),
        InitRulesWarning,
        stacklevel=3,
    )


def _write_error(
    item: PlannedTensor, written: int | None, error: Exception
) -> ApplyError:
    """Return the error for a failed write; ``written`` is None when not counted."""
    # NOTE: the plan checks every argument it can against each tensor, so this
    # is reached only when a scheme fails in a way the plan cannot predict
    # (for example, user code in a module's reset_parameters()).
    rule = item.match.rule
    if written is None:
        done = "other tensors were written on parallel threads"
    else:
        done = f"{written} tensor(s) were written before it"
    return ApplyError(
        f"{rule.label(item.match.rule_index)} failed on {item.entry.name!r}: "
        f"{type(error).__name__}: {error}; {done}, so the model is partly initialized"
    )


def _handle_unmatched(plan: Plan) -> None:
    if not plan.unmatched:
        return
    names = [entry.name for entry in plan.unmatched]
    mode = plan.policy.on_unmatched
    if mode == "error":
        raise UnmatchedTensorsError(names, plan.policy.path)
    if mode == "warn" and rank() == 0:
        warnings.warn(
            f"{len(names)} parameter(s) matched no rule of {plan.policy.path} and "
            f"keep their current values: {', '.join(names[:10])}"
            + (" ..." if len(names) > 10 else ""),
            InitRulesWarning,
            stacklevel=3,
        )


def _fill(
    item: PlannedTensor,
    seed: int | None,
    fill_stats: dict[int, Measured] | None = None,
) -> int:
    """Write one tensor or block; return how many rows were zeroed after the draw.

    A block's random stream is named by its label, so each block of a split
    tensor draws from its own generators. When ``fill_stats`` is given, a
    tensor drawn in chunks is measured chunk by chunk as it is drawn, and
    its statistics are stored there under ``id(item)``.
    """
    entry = item.entry
    target = item.target
    args = item.args
    draw = item.scheme.draw
    sums: ChunkSums | None = None
    if seed is not None and draw is not None and target.numel() > CHUNK_ELEMENTS:
        if (
            fill_stats is not None
            and target.is_contiguous()
            and entry.parametrization is None
        ):
            sums = ChunkSums(target.numel())
        hook = sums.add if sums is not None else None
        fill_chunked(target, draw(item.shape, args), seed, item.label, hook)
    elif draw is not None and target.dtype.itemsize >= 4 and target.is_contiguous():
        # What the scheme's fill does, without building its context: the
        # common case of a deep model's many small tensors.
        generator = None
        if seed is not None:
            generator = torch.Generator(device=target.device)
            generator.manual_seed(derive_seed(seed, item.label))
        draw(item.shape, args).sample_(target, generator)
    else:
        tensor_seed = derive_seed(seed, item.label) if seed is not None else None
        generator = None
        if tensor_seed is not None and item.scheme.random:
            generator = torch.Generator(device=target.device)
            generator.manual_seed(tensor_seed)
        context = FillContext(
            entry.module, entry.info.local_name, generator, tensor_seed, item.source
        )
        if target.is_contiguous():
            item.scheme.fill(target, args, context)
        else:
            # A block across rows is a strided view; schemes fill dense tensors.
            scratch = torch.empty(item.shape, dtype=target.dtype, device=target.device)
            item.scheme.fill(scratch, args, context)
            target.copy_(scratch)
    return _after_draw(item, sums, fill_stats)


def _after_draw(
    item: PlannedTensor,
    sums: ChunkSums | None,
    fill_stats: dict[int, Measured] | None,
) -> int:
    """Zero an embedding's padding row, or keep the statistics taken while drawing.

    Returns how many rows were zeroed.
    """
    padding_index = _padding_index(item)
    if padding_index is None:
        if sums is not None and fill_stats is not None:
            result = sums.measured()
            if result is not None:
                fill_stats[id(item)] = result
        return 0
    item.entry.tensor[padding_index].zero_()
    return 1


def _overlapping(plan: Plan) -> set[int]:
    """Return the ids of the entries whose memory another entry shares.

    Such tensors (two parameters cut from one buffer) must be written one
    after another, in module order, and measured after every write.
    """
    owners: dict[int, TensorEntry] = {}
    overlapping: set[int] = set()
    for item in plan.planned:
        entry = item.entry
        # NOTE: tensors are compared by storage, so two disjoint views of one
        # buffer count as overlapping too, and lose only the parallel draw.
        owner = owners.setdefault(entry.tensor.untyped_storage().data_ptr(), entry)
        if owner is not entry:
            overlapping.update((id(owner), id(entry)))
    return overlapping


def _draw_pooled(
    plan: Plan, seed: int, fill_stats: dict[int, Measured], overlapping: set[int]
) -> dict[int, int]:
    """Draw every elementwise random tensor of the plan on one shared thread pool.

    Covers the items that :func:`_fill` would draw from the seeded stream
    straight into a contiguous CPU tensor, with the same values, except the
    entries in ``overlapping``. Returns the rows zeroed after the draw, by
    ``id`` of each item drawn; the caller writes the other items.

    Raises:
        ApplyError: A draw failed.
    """
    items: list[PlannedTensor] = []
    jobs: list[DrawJob] = []
    sums: list[ChunkSums | None] = []
    # The tensors of one rule and shape share their distribution. The items
    # keep each key's arguments alive, so an id is not reused meanwhile.
    draws: dict[tuple[int, int, tuple[int, ...]], Draw] = {}
    for item in plan.planned:
        draw = item.scheme.draw
        target = item.target
        if (
            draw is None
            or item.entry.parametrization is not None
            or id(item.entry) in overlapping
            or target.device.type != "cpu"
            or not target.is_contiguous()
        ):
            continue
        count = target.numel()
        # Small tensors are measured later, many at once (measure_many).
        chunk_sums = ChunkSums(count) if count > MEASURED_ALONE else None
        hook = chunk_sums.add if chunk_sums is not None else None
        key = (id(draw), id(item.args), item.shape)
        chosen = draws.get(key)
        if chosen is None:
            chosen = draws[key] = draw(item.shape, item.args)
        items.append(item)
        jobs.append(DrawJob(target, chosen, item.label, hook))
        sums.append(chunk_sums)
    try:
        draw_all(jobs, seed)
    except DrawJobError as error:
        cause = error.__cause__
        assert isinstance(cause, Exception)
        failure = _write_error(items[error.index], None, cause)
        raise failure from cause
    return {
        id(item): _after_draw(item, chunk_sums, fill_stats)
        for item, chunk_sums in zip(items, sums, strict=True)
    }


def _write_parametrized(plan: Plan, notes: dict[int, str]) -> None:
    """Set every parametrized tensor through its parametrization; note how it went."""
    for item in plan.planned:
        entry = item.entry
        if entry.parametrization is None or id(entry) in notes:
            continue
        blocks = [other for other in plan.planned if other.entry is entry]
        if not any(other.scheme.writes for other in blocks):
            notes[id(entry)] = ""
            continue
        try:
            notes[id(entry)] = _write_through(item)
        except Exception as error:
            rule = item.match.rule.label(item.match.rule_index)
            raise ApplyError(
                f"{rule}: setting {entry.name!r} through its parametrization "
                f"failed: {type(error).__name__}: {error}; the other tensors are "
                "written, so the model is partly initialized"
            ) from error


def _write_through(item: PlannedTensor) -> str:
    """Set a parametrized tensor to its drawn value through ``right_inverse``.

    ``entry.tensor`` contains the drawn value. When the module's effective
    value then equals it (``weight_norm``), the entry takes the effective
    value, so the checks judge what the module computes. When the
    parametrization changes it (``spectral_norm`` divides by the largest
    singular value), the checks judge the draw, and the returned note says
    by how much the effective value differs.
    """
    entry = item.entry
    chain = entry.parametrization
    assert chain is not None
    drawn = entry.tensor
    # A copy: right_inverse may keep the tensor it is given as an original.
    chain.right_inverse(drawn.clone())
    modes = [(step, step.training) for step in chain.modules()]
    chain.eval()
    try:
        effective = getattr(entry.module, entry.info.local_name).detach()
    finally:
        for step, mode in modes:
            step.training = mode
    scale = float(drawn.abs().max()) if drawn.numel() else 0.0
    difference = float((effective - drawn).abs().max()) if drawn.numel() else 0.0
    # Recomputing the value rounds a few times in the tensor's dtype.
    if difference <= 8 * torch.finfo(drawn.dtype).eps * scale:
        drawn.copy_(effective)
        return "written through its parametrization"
    steps = ", ".join(type(step).__name__ for step in chain)
    return (
        f"written through its parametrization ({steps}), which changes the values: "
        f"the effective tensor differs from the draw by up to {difference:.3g}; the "
        "checks judge the draw"
    )


def _padding_index(item: PlannedTensor) -> int | None:
    """Return the embedding row the engine zeroes after a random scheme, if any.

    torch and transformers keep an embedding's ``padding_idx`` row at zero.
    Any owner of a tied tensor counts, so a head tied to an embedding with a
    ``padding_idx`` keeps the zero row whichever name comes first.
    """
    entry = item.entry
    if item.chunk is not None or not (
        item.scheme.random and item.match.rule.zero_padding_idx
    ):
        # NOTE: a split embedding keeps its padding row as its blocks drew it.
        return None
    owners = zip(
        [entry.module, *entry.alias_modules],
        [entry.info, *entry.alias_infos],
        strict=True,
    )
    for module, info in owners:
        if (
            info.local_name == "weight"
            and isinstance(module, (nn.Embedding, nn.EmbeddingBag))
            and module.padding_idx is not None
        ):
            return int(module.padding_idx)
    return None


def _row(
    item: PlannedTensor,
    measured: Measured | None,
    expected: ExpectedStats | None,
    zeroed_rows: int,
    facts: _RuleFacts,
) -> Row:
    entry = item.entry
    chunk = item.chunk
    return Row(
        name=entry.name,
        aliases=tuple(entry.aliases),
        shape=item.shape,
        dtype=entry.info.dtype,
        module_type=entry.info.module_class.__name__,
        kind=entry.info.kind,
        rule_index=item.match.rule_index,
        rule_name=facts.name,
        rule_location=facts.location,
        scheme=item.scheme.name,
        # The planner may resolve arguments per tensor (fans: module, a
        # checkpoint key); otherwise every row of a rule shares its arguments.
        args=dict(facts.args)
        if facts.args is not None and item.args is item.match.rule.init.args
        else item.args.model_dump(),
        captures=dict(item.match.captures),
        mean=measured.mean if measured else None,
        std=measured.std if measured else None,
        min=measured.min if measured else None,
        max=measured.max if measured else None,
        expected_mean=expected.mean if expected else None,
        expected_std=expected.std if expected else None,
        note=_padding_note(entry, zeroed_rows),
        chunk=None if chunk is None else (chunk.index, chunk.count, chunk.dim),
    )


def _padding_note(entry: TensorEntry, zeroed_rows: int) -> str:
    if not zeroed_rows:
        return ""
    for module in (entry.module, *entry.alias_modules):
        padding_idx = getattr(module, "padding_idx", None)
        if isinstance(padding_idx, int):
            return f"padding row {padding_idx} zeroed"
    return "padding row zeroed"
