"""Apply a policy to a model: plan everything, then write under ``no_grad``."""

from __future__ import annotations

import hashlib
import logging
import os
import warnings

import torch
from torch import nn

from initrules.errors import ApplyError, InitRulesWarning, UnmatchedTensorsError
from initrules.expected import expected_stats
from initrules.loader import load_policy
from initrules.planner import Plan, PlannedTensor, make_plan
from initrules.report import Report, Row, Skipped
from initrules.schema import Policy
from initrules.schemes import FillContext

__all__ = ["apply", "derive_seed", "resolve_policy"]

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


def derive_seed(seed: int, name: str) -> int:
    """Return the 63-bit seed of one tensor, from the run's seed and its name.

    The value depends only on these two inputs, so a tensor's draw does not
    change when other rules or tensors are added, removed or reordered.
    """
    digest = hashlib.blake2b(f"{seed}\x00{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def apply(model: nn.Module, policy: PolicySource, *, seed: int | None = None) -> Report:
    """Initialize the tensors of ``model`` by ``policy`` and return the report.

    Every tensor's rule is resolved and every scheme checked against its
    tensor before anything is written, so an error leaves the model as it
    was. Parameters keep their identity and ``requires_grad``; tied tensors
    are written once.

    Args:
        model: The model to initialize, materialized (not on the meta device).
        policy: A policy file path or a :class:`Policy`.
        seed: When given, each tensor draws from its own generator seeded from
            ``seed`` and its canonical name. When ``None``, draws come from
            torch's global generator (``torch.manual_seed``).

    Returns:
        The report of what each tensor got.

    Raises:
        PolicyError: The policy is invalid.
        PlanError: A scheme cannot apply to a tensor, or the model is on meta.
        UnmatchedTensorsError: Parameters matched no rule under
            ``on_unmatched: error``.

    Example:
        >>> import torch, initrules
        >>> policy = initrules.load_policy(text='''
        ... rules:
        ...   - {match: {param: weight}, init: {scheme: xavier_uniform}}
        ...   - {match: {param: bias}, init: zeros}
        ... ''')
        >>> report = initrules.apply(torch.nn.Linear(4, 3), policy, seed=0)
        >>> report.summary["initialized"]
        2
    """
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    resolved = resolve_policy(policy)
    plan = make_plan(model, resolved)
    _handle_unmatched(plan)
    report = Report(
        policy_name=resolved.name or resolved.path,
        policy_path=resolved.path,
        seed=seed,
        unmatched=[entry.name for entry in plan.unmatched],
        skipped=[Skipped(item.entry.name, item.reason) for item in plan.skipped],
        untouched_buffers=plan.untouched_buffers,
    )
    with torch.no_grad():
        for written, item in enumerate(plan.planned):
            try:
                note = _fill(item, seed)
            except Exception as error:
                raise _write_error(item, written, error) from error
            report.rows.append(_row(item, note))
    logger.info(
        "initialized %d tensors with policy %s (%d unmatched, %d skipped)",
        len(report.rows),
        report.policy_name,
        len(report.unmatched),
        len(report.skipped),
    )
    return report


def _write_error(item: PlannedTensor, written: int, error: Exception) -> ApplyError:
    # NOTE: the plan checks every argument it can against each tensor, so this
    # is reached only when a scheme fails in a way the plan cannot predict
    # (for example, user code in a module's reset_parameters()).
    rule = item.match.rule
    return ApplyError(
        f"{rule.label(item.match.rule_index)} failed on {item.entry.name!r}: "
        f"{type(error).__name__}: {error}; {written} tensor(s) were written before "
        "it, so the model is partly initialized"
    )


def _handle_unmatched(plan: Plan) -> None:
    if not plan.unmatched:
        return
    names = [entry.name for entry in plan.unmatched]
    mode = plan.policy.on_unmatched
    if mode == "error":
        raise UnmatchedTensorsError(names, plan.policy.path)
    if mode == "warn":
        warnings.warn(
            f"{len(names)} parameter(s) matched no rule of {plan.policy.path} and "
            f"keep their current values: {', '.join(names[:10])}"
            + (" ..." if len(names) > 10 else ""),
            InitRulesWarning,
            stacklevel=3,
        )


def _fill(item: PlannedTensor, seed: int | None) -> str:
    entry = item.entry
    tensor_seed = derive_seed(seed, entry.name) if seed is not None else None
    generator = None
    if tensor_seed is not None and item.scheme.random:
        generator = torch.Generator(device=entry.tensor.device)
        generator.manual_seed(tensor_seed)
    context = FillContext(entry.module, entry.info.local_name, generator, tensor_seed)
    item.scheme.fill(entry.tensor, item.match.rule.init.args, context)
    return _zero_padding_row(item)


def _zero_padding_row(item: PlannedTensor) -> str:
    """Zero an embedding's padding row after a random scheme, as torch does.

    Any owner of a tied tensor counts, so a head tied to an embedding with a
    ``padding_idx`` keeps the zero row whichever name comes first.
    """
    entry = item.entry
    if not (item.scheme.random and item.match.rule.zero_padding_idx):
        return ""
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
            entry.tensor[module.padding_idx].zero_()
            return f"padding row {module.padding_idx} zeroed"
    return ""


def _row(item: PlannedTensor, note: str) -> Row:
    entry = item.entry
    tensor = entry.tensor
    rule = item.match.rule
    mean, std, low, high = _statistics(tensor)
    expected = expected_stats(item.scheme.name, tuple(tensor.shape), rule.init.args)
    return Row(
        name=entry.name,
        aliases=tuple(entry.aliases),
        shape=tuple(tensor.shape),
        dtype=entry.info.dtype,
        module_type=type(entry.module).__name__,
        kind=entry.info.kind,
        rule_index=item.match.rule_index,
        rule_name=rule.name,
        rule_location=str(rule.location) if rule.location else None,
        scheme=item.scheme.name,
        args=rule.init.args.model_dump(),
        captures=dict(item.match.captures),
        mean=mean,
        std=std,
        min=low,
        max=high,
        expected_mean=expected.mean if expected else None,
        expected_std=expected.std if expected else None,
        note=note,
    )


def _statistics(
    tensor: torch.Tensor,
) -> tuple[float | None, float | None, float | None, float | None]:
    if tensor.numel() == 0 or tensor.dtype == torch.bool or tensor.is_complex():
        return None, None, None, None
    values = tensor.detach()
    # Integer and narrow float dtypes (float16, bfloat16, float8) have no or
    # imprecise reduction kernels, so their statistics are taken in float32.
    if not values.is_floating_point() or values.dtype.itemsize < 4:
        values = values.float()
    if values.numel() == 1:
        value = float(values.reshape(()))
        return value, 0.0, value, value
    std, mean = torch.std_mean(values)
    low, high = torch.aminmax(values)
    return float(mean), float(std), float(low), float(high)
