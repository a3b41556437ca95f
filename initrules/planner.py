"""Walk a model once and decide, for every tensor, which rule initializes it.

The plan is complete before anything is written: every tensor has a rule (or
is listed as unmatched or skipped), and every scheme has accepted its tensor's
shape and dtype. Tensors shared under several names (tied weights) appear
once, under their first name in module order.
"""

from __future__ import annotations

import functools
import logging
import math
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import ValidationError
from torch import nn
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter
from torch.nn.utils import parametrize

from initrules.errors import PlanError, PolicyError
from initrules.expressions import ExpressionError, Scope
from initrules.fans import true_fans
from initrules.matcher import Matcher, MatchResult, TensorInfo
from initrules.pretrained import Checkpoints, PretrainedArgs
from initrules.schema import Policy
from initrules.schemes import FanArgs, Scheme, SchemeArgs, compute_fans, get_scheme

__all__ = [
    "Chunk",
    "Plan",
    "PlanProblem",
    "PlannedTensor",
    "SkippedTensor",
    "TensorEntry",
    "is_wrapper_segment",
    "make_plan",
    "walk_modules",
    "walk_tensors",
]

logger = logging.getLogger(__name__)

# Child attribute names that wrappers insert and that never belong to the
# architecture: torch.compile's OptimizedModule, FSDP (version 1) and the
# activation checkpoint wrapper. DDP's and DataParallel's `module` is handled
# by type, since `module` is also a common name for ordinary children.
_WRAPPER_SEGMENTS = frozenset(
    {"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"}
)
_DATA_PARALLEL = (nn.DataParallel, nn.parallel.DistributedDataParallel)


@dataclass
class TensorEntry:
    """One distinct tensor of the model, found by the walk.

    Attributes:
        info: The matcher's input (canonical name, classes, ndim, dtype).
        tensor: The tensor itself (a Parameter or a buffer).
        module: The module that owns it.
        aliases: Other canonical names of the same tensor (tied weights).
        alias_infos: What the matcher would see under each alias.
        alias_modules: The module that owns the tensor under each alias.
        parametrization: For a parametrized tensor (``weight_norm``,
            ``spectral_norm``, ...), the module's ``ParametrizationList``;
            ``tensor`` then contains the effective value, computed at the walk,
            and writes go through the parametrization's ``right_inverse``.
    """

    info: TensorInfo
    tensor: torch.Tensor
    module: nn.Module
    aliases: list[str] = field(default_factory=list)
    alias_infos: list[TensorInfo] = field(default_factory=list)
    alias_modules: list[nn.Module] = field(default_factory=list)
    parametrization: parametrize.ParametrizationList | None = None

    @property
    def name(self) -> str:
        """Canonical name: the first name of the tensor in module order."""
        return self.info.name


@dataclass(frozen=True)
class Chunk:
    """One of ``count`` equal blocks of a tensor along dimension ``dim``.

    Attributes:
        index: 0-based position of the block.
        count: Number of blocks.
        dim: The dimension the tensor is split along.
    """

    index: int
    count: int
    dim: int

    def shape_of(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Return the block's shape within a tensor of ``shape``."""
        return (
            *shape[: self.dim],
            shape[self.dim] // self.count,
            *shape[self.dim + 1 :],
        )

    def view(self, tensor: torch.Tensor) -> torch.Tensor:
        """Return the block as a view of ``tensor``."""
        size = tensor.shape[self.dim] // self.count
        return tensor.narrow(self.dim, self.index * size, size)

    def __str__(self) -> str:
        return f"chunk {self.index} of {self.count}, dim {self.dim}"


@dataclass
class PlannedTensor:
    """A tensor, or one block of it, with its winning rule and scheme.

    Attributes:
        entry: The tensor.
        match: Its winning rule.
        scheme: The scheme that fills it.
        args: The scheme's arguments for this tensor, with the rule's
            expressions evaluated (the rule's own arguments when it has none).
        chunk: The block this item fills when a rule split the tensor, else
            ``None`` for the whole tensor.
        source: Reads the values a ``pretrained`` rule copies, else ``None``.
    """

    entry: TensorEntry
    match: MatchResult
    scheme: Scheme
    args: SchemeArgs
    chunk: Chunk | None = None
    source: Callable[[], torch.Tensor] | None = None

    @property
    def target(self) -> torch.Tensor:
        """The tensor the scheme fills: the whole tensor or a view of the block."""
        tensor = self.entry.tensor
        return tensor if self.chunk is None else self.chunk.view(tensor)

    # Cached: the engine and the checks read these thousands of times on deep
    # models, and an item's tensor and block never change.
    @functools.cached_property
    def shape(self) -> tuple[int, ...]:
        """The shape the scheme fills: the tensor's or the block's."""
        shape = tuple(self.entry.tensor.shape)
        return shape if self.chunk is None else self.chunk.shape_of(shape)

    @functools.cached_property
    def label(self) -> str:
        """The canonical name, with the block for one chunk of a tensor.

        Seeded runs also name the block's random stream by it.
        """
        name = self.entry.name
        return name if self.chunk is None else f"{name}[{self.chunk}]"


@dataclass
class SkippedTensor:
    """A tensor that a rule matched but that is not written, with the reason."""

    entry: TensorEntry
    reason: str
    match: MatchResult | None = None


@dataclass
class PlanProblem:
    """A tensor whose winning rule's scheme cannot fill it.

    Attributes:
        entry: The tensor.
        match: Its winning rule.
        reason: Why the scheme cannot fill it.
        detail: The message after the rule's label: tensor, shape, dtype,
            reason and fix.
    """

    entry: TensorEntry
    match: MatchResult
    reason: str
    detail: str

    @property
    def message(self) -> str:
        """The full message, starting with the rule and its position."""
        rule = self.match.rule
        return f"{rule.label(self.match.rule_index)} {self.detail}"


@dataclass
class Plan:
    """Everything ``apply`` will do, resolved before any tensor is written.

    Attributes:
        policy: The policy the plan came from.
        planned: Tensors to initialize, in module order.
        unmatched: Parameters that no rule matched.
        skipped: Matched tensors that will not be written (zero elements).
        untouched_buffers: Canonical names of buffers no rule targets.
        lazy: Canonical names of lazy modules' tensors, not materialized yet.
        problems: Tensors whose scheme cannot fill them; empty unless the
            plan was made with ``raise_problems=False``.
    """

    policy: Policy
    planned: list[PlannedTensor]
    unmatched: list[TensorEntry]
    skipped: list[SkippedTensor]
    untouched_buffers: list[str]
    problems: list[PlanProblem] = field(default_factory=list)
    lazy: list[str] = field(default_factory=list)

    def raise_for_problems(self) -> None:
        """Raise a PlanError listing ``problems``, if there are any."""
        if self.problems:
            _raise_problems([problem.message for problem in self.problems])


def is_wrapper_segment(parent: nn.Module, child_name: str) -> bool:
    """Return True if ``child_name`` under ``parent`` is a wrapper segment."""
    if child_name in _WRAPPER_SEGMENTS:
        return True
    return child_name == "module" and isinstance(parent, _DATA_PARALLEL)


def _walk_modules(
    model: nn.Module,
) -> Iterator[tuple[tuple[str, ...], nn.Module, tuple[type, ...]]]:
    # Depth first, parents before children, children in registration order.
    # An explicit stack: nested generators cost microseconds per module and
    # level, which adds up on deep models.
    stack: list[tuple[tuple[str, ...], nn.Module, tuple[type, ...], frozenset[int]]]
    stack = [((), model, (), frozenset())]
    while stack:
        prefix, module, ancestors, path = stack.pop()
        yield prefix, module, ancestors
        inner_ancestors = (*ancestors, type(module))
        inner_path = path | {id(module)}
        children = []
        for child_name, child in module._modules.items():
            # A child that is its own ancestor would make the walk endless; its
            # tensors were already reached through that ancestor.
            if child is None or id(child) in inner_path:
                continue
            if is_wrapper_segment(module, child_name):
                # The wrapper is not part of the architecture: its child takes
                # its place, with the same prefix and the same ancestors.
                children.append((prefix, child, ancestors, inner_path))
            else:
                children.append(
                    ((*prefix, child_name), child, inner_ancestors, inner_path)
                )
        stack += reversed(children)


def walk_modules(
    model: nn.Module,
) -> Iterator[tuple[tuple[str, ...], nn.Module, tuple[type, ...]]]:
    """Yield ``(name segments, module, ancestor classes)`` in module order.

    Wrapper segments are left out of the names, so a wrapper and the module
    it wraps share a name (the root's is the empty tuple).
    """
    return _walk_modules(model)


_PLAIN_TYPES = (torch.Tensor, nn.Parameter)


def _is_parametrized(module: nn.Module) -> bool:
    """Return ``parametrize.is_parametrized(module)``, cheaply for plain modules.

    The parametrizations live in ``module._modules``, and looking there
    first avoids ``nn.Module.__getattr__``, which costs microseconds per
    module.
    """
    if not isinstance(module._modules.get("parametrizations"), nn.ModuleDict):
        return False
    return parametrize.is_parametrized(module)


@functools.cache
def _dtype_text(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def walk_tensors(
    model: nn.Module, *, lazy: list[str] | None = None
) -> tuple[list[TensorEntry], list[TensorEntry]]:
    """Return the model's distinct parameters and buffers, in module order.

    A tensor reachable under several names appears once, under its first
    name; the other names are listed as its aliases. A parametrized tensor
    appears under the name the module exposes (``weight``), not under its
    ``parametrizations.weight.original*`` storage.

    Args:
        model: The model to walk.
        lazy: A list to add the names of lazy modules' unmaterialized
            tensors to; without it they raise a PlanError.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    seen: dict[int, TensorEntry] = {}
    unmaterialized: list[str] = []
    parameters: list[TensorEntry] = []
    buffers: list[TensorEntry] = []
    for prefix, module, ancestors in _walk_modules(model):
        tensors: list[tuple[str, torch.Tensor | None, str]] = []
        if not isinstance(module, parametrize.ParametrizationList):
            # A ParametrizationList's originals are reached through its owner.
            tensors += [
                (name, value, "parameter") for name, value in module._parameters.items()
            ]
        tensors += [(name, value, "buffer") for name, value in module._buffers.items()]
        module_class = type(module)
        if _is_parametrized(module):
            for entry in _parametrized_entries(module, prefix, ancestors):
                # A parametrized module shared under two names has one chain.
                chain = entry.parametrization
                existing = seen.get(id(chain))
                if existing is None:
                    seen[id(chain)] = entry
                    parameters.append(entry)
                elif entry.name != existing.name:
                    existing.aliases.append(entry.name)
                    existing.alias_infos.append(entry.info)
                    existing.alias_modules.append(module)
            # torch subclasses the module's class as Parametrized<Class>.
            module_class = module_class.__mro__[1]
        for local_name, tensor, kind in tensors:
            if tensor is None:
                continue
            name = ".".join((*prefix, local_name))
            # isinstance against a Parameter subclass runs a Python metaclass
            # check, so plain tensors and parameters skip it.
            if type(tensor) not in _PLAIN_TYPES and isinstance(
                tensor, (UninitializedParameter, UninitializedBuffer)
            ):
                unmaterialized.append(name)
                continue
            info = TensorInfo(
                name=name,
                local_name=local_name,
                module_class=module_class,
                ancestor_classes=ancestors,
                ndim=tensor.dim(),
                dtype=_dtype_text(tensor.dtype),
                kind=kind,
            )
            existing = seen.get(id(tensor))
            if existing is not None:
                if name != existing.name and name not in existing.aliases:
                    existing.aliases.append(name)
                    existing.alias_infos.append(info)
                    existing.alias_modules.append(module)
                continue
            entry = TensorEntry(info, tensor, module)
            seen[id(tensor)] = entry
            (parameters if kind == "parameter" else buffers).append(entry)
    if lazy is not None:
        lazy += unmaterialized
    elif unmaterialized:
        raise PlanError(
            f"{len(unmaterialized)} tensor(s) of lazy modules are not materialized "
            f"yet (first: {unmaterialized[0]!r}); run one forward pass with example "
            "inputs before initializing"
        )
    return parameters, buffers


def _parametrized_entries(
    module: nn.Module, prefix: tuple[str, ...], ancestors: tuple[type, ...]
) -> list[TensorEntry]:
    """Return one entry per parametrized tensor of ``module``, by its exposed name."""
    entries = []
    parametrizations = module.parametrizations
    assert isinstance(parametrizations, nn.ModuleDict)
    for local_name, chain in parametrizations.items():
        assert isinstance(chain, parametrize.ParametrizationList)
        # In training mode some parametrizations update state when read
        # (spectral_norm's power iteration); reading must change nothing.
        modes = [(step, step.training) for step in chain.modules()]
        chain.eval()
        try:
            with torch.no_grad():
                value = getattr(module, local_name).detach().clone()
        finally:
            for step, mode in modes:
                step.training = mode
        info = TensorInfo(
            name=".".join((*prefix, local_name)),
            local_name=local_name,
            module_class=type(module).__mro__[1],
            ancestor_classes=ancestors,
            ndim=value.dim(),
            dtype=str(value.dtype).removeprefix("torch."),
        )
        entries.append(TensorEntry(info, value, module, parametrization=chain))
    return entries


def make_plan(
    model: nn.Module,
    policy: Policy,
    *,
    all_matches: bool = False,
    allow_meta: bool = False,
    raise_problems: bool = True,
    variables: Mapping[str, float] | None = None,
) -> Plan:
    """Resolve the winning rule of every tensor and check every scheme.

    Args:
        model: The model to plan for.
        policy: A validated policy.
        all_matches: Record later matching rules in each match result.
        allow_meta: Accept tensors on the meta device (for linting a model
            built without memory); the plan then cannot be applied.
        raise_problems: Raise on tensors a scheme cannot fill; when False,
            list them in ``Plan.problems`` instead.
        variables: Values that override the policy's ``vars`` in argument
            expressions.

    Raises:
        PlanError: The model is on the meta device, or some scheme cannot
            apply to a tensor its rule won (all such tensors are listed).
        PolicyError: A rule's regex timed out.
    """
    lazy: list[str] = []
    parameters, buffers = walk_tensors(model, lazy=lazy)
    if lazy:
        logger.warning(
            "%d tensor(s) of lazy modules are not materialized and are skipped "
            "(first: %r); run one forward pass with example inputs to initialize them",
            len(lazy),
            lazy[0],
        )
    if not allow_meta:
        _reject_meta(parameters + buffers)
    matcher = Matcher(policy)
    resolver = ArgumentResolver(model, policy, variables)
    checkpoints = Checkpoints()
    verdicts = _Verdicts()

    planned: list[PlannedTensor] = []
    unmatched: list[TensorEntry] = []
    skipped: list[SkippedTensor] = []
    untouched: list[str] = []
    problems: list[PlanProblem] = []
    # Labels are built only when they are logged: one costs a few microseconds.
    debug = logger.isEnabledFor(logging.DEBUG)
    for entry in parameters + buffers:
        result = matcher.match(entry.info, all_matches=all_matches)
        if result is None:
            if entry.info.kind == "parameter":
                unmatched.append(entry)
            else:
                untouched.append(entry.name)
            continue
        rule = result.rule
        if rule.match.chunk is None and rule.init.chunks == 1:
            blocks: list[tuple[Chunk | None, MatchResult]] | PlanProblem
            blocks = [(None, result)]
        else:
            blocks = _blocks(entry, result, matcher)
        if isinstance(blocks, PlanProblem):
            problems.append(blocks)
            continue
        items = [
            _plan_one(entry, block, chunk, resolver, checkpoints, verdicts)
            for chunk, block in blocks
        ]
        found = [item for item in items if isinstance(item, PlanProblem)]
        if found:
            # A reason that holds for every block is reported once.
            problems += {problem.detail: problem for problem in found}.values()
            continue
        ready = [item for item in items if isinstance(item, PlannedTensor)]
        if entry.tensor.numel() == 0 and any(item.scheme.writes for item in ready):
            skipped.append(SkippedTensor(entry, "zero elements", result))
            continue
        planned += ready
        if debug:
            for item in ready:
                logger.debug(
                    "%s -> %s (%s)",
                    item.label,
                    item.match.rule.label(item.match.rule_index),
                    item.scheme.name,
                )

    if problems and raise_problems:
        _raise_problems([problem.message for problem in problems])
    return Plan(policy, planned, unmatched, skipped, untouched, problems, lazy)


def _plan_one(
    entry: TensorEntry,
    result: MatchResult,
    chunk: Chunk | None,
    resolver: ArgumentResolver,
    checkpoints: Checkpoints,
    verdicts: _Verdicts,
) -> PlannedTensor | PlanProblem:
    """Resolve the arguments of one tensor or block and check its scheme."""
    scheme = get_scheme(result.rule.init.scheme)
    shape = tuple(entry.tensor.shape)
    if chunk is not None:
        shape = chunk.shape_of(shape)
        if scheme.needs_module_reset or scheme.needs_data:
            return _problem(
                entry,
                result,
                f"{scheme.name} initializes whole tensors and cannot fill chunks",
                "use another scheme for the blocks, or do not split this tensor",
            )

    args = resolver.resolve(entry, result, scheme, shape)
    if isinstance(args, PlanProblem):
        return args
    if isinstance(args, FanArgs) and args.fans == "module":
        fans = true_fans(entry.module, entry.info.local_name, shape)
        if fans is None:
            return _problem(
                entry,
                result,
                f"fans: module needs the weight of a module whose layout initrules "
                f"recognizes (Linear, convolutions, transformers' Conv1D, "
                f"MultiheadAttention, RNN/LSTM/GRU), and "
                f"{entry.info.local_name!r} of {entry.info.module_class.__name__} "
                "is not one",
                "use fans: torch, or give fan_in and fan_out explicitly",
            )
        args = args.model_copy(update={"fan_in": fans[0], "fan_out": fans[1]})

    problem = _check(entry, result, scheme, args, shape, chunk, verdicts)
    if problem is not None:
        return problem

    if not isinstance(args, PretrainedArgs):
        return PlannedTensor(entry, result, scheme, args, chunk)
    found = _pretrained_source(entry, result, chunk, args, checkpoints)
    if isinstance(found, PlanProblem):
        return found
    key, source = found
    if key != args.key:
        args = args.model_copy(update={"key": key})
    return PlannedTensor(entry, result, scheme, args, chunk, source)


def _pretrained_source(
    entry: TensorEntry,
    result: MatchResult,
    chunk: Chunk | None,
    args: PretrainedArgs,
    checkpoints: Checkpoints,
) -> tuple[str, Callable[[], torch.Tensor]] | PlanProblem:
    """Find the checkpoint key a ``pretrained`` tensor reads, and its reader."""
    if chunk is not None:
        return _problem(
            entry,
            result,
            "pretrained copies whole tensors and cannot fill chunks",
            "do not split this tensor",
        )
    location = result.rule.location
    base = Path.cwd()
    if location is not None and location.path != "<text>":
        base = Path(location.path).parent
    try:
        return checkpoints.source(
            entry.name, tuple(entry.tensor.shape), entry.tensor.dtype, args, base
        )
    except ValueError as error:
        return _problem(entry, result, str(error), "fix the rule's path, prefix or key")


def _blocks(
    entry: TensorEntry, result: MatchResult, matcher: Matcher
) -> list[tuple[Chunk | None, MatchResult]] | PlanProblem:
    """Split a tensor into the blocks its winning rule requests, each with a rule.

    A winner with ``init.chunks`` fills every block itself. A winner that
    selects one block with ``match.chunk`` gets that block; each other block
    goes to the first later rule that matches the tensor and either selects
    that block of the same split or selects no block.
    """
    rule = result.rule
    selected = rule.match.chunk
    if selected is None:
        count, dim = rule.init.chunks, rule.init.dim
    else:
        count, dim = selected[1], rule.match.chunk_dim
    shape = tuple(entry.tensor.shape)
    problem = _split_problem(entry, result, count, dim, shape)
    if problem is not None:
        return problem
    if selected is None:
        return [(Chunk(index, count, dim), result) for index in range(count)]
    owners: dict[int, MatchResult] = {selected[0]: result}
    for later in matcher.later_matches(entry.info, result.rule_index):
        if len(owners) == count:
            break
        choice = later.rule.match.chunk
        if choice is None:
            for index in range(count):
                owners.setdefault(index, later)
        elif choice[1] == count and later.rule.match.chunk_dim == dim:
            owners.setdefault(choice[0], later)
    missing = [index for index in range(count) if index not in owners]
    if missing:
        blocks = ", ".join(map(str, missing))
        return _problem(
            entry,
            result,
            f"the rule splits the tensor into {count} chunks along dim {dim}, and "
            f"no rule matches chunk(s) {blocks}",
            "add a rule for the other chunks (a rule without 'chunk' takes every "
            "chunk left)",
        )
    blocks_with_rules: list[tuple[Chunk | None, MatchResult]] = []
    for index in range(count):
        owner = owners[index]
        if owner.rule.init.chunks > 1:
            return _problem(
                entry,
                owner,
                f"the rule splits chunk {index} of {count} (dim {dim}), which "
                f"{rule.label(result.rule_index)} already made a block of its own",
                "drop 'chunks' from this rule's init, or narrow its match",
            )
        blocks_with_rules.append((Chunk(index, count, dim), owner))
    return blocks_with_rules


def _split_problem(
    entry: TensorEntry,
    result: MatchResult,
    count: int,
    dim: int,
    shape: tuple[int, ...],
) -> PlanProblem | None:
    if dim >= len(shape):
        return _problem(
            entry,
            result,
            f"the rule splits dim {dim}, and the tensor has {len(shape)} dimension(s)",
            "choose a dim the tensor has",
        )
    if shape[dim] % count:
        return _problem(
            entry,
            result,
            f"{count} chunks do not divide dim {dim} of size {shape[dim]}",
            "use a chunk count that divides the size, or narrow the rule's match",
        )
    return None


class ArgumentResolver:
    """Evaluates a rule's argument expressions for each tensor it wins.

    Rules without expressions keep their validated arguments. For the
    others, each tensor gets the names it needs (vars, regex groups, fans,
    numel, shape, the owning module's and the model's config attributes)
    and its own validated arguments.
    """

    def __init__(
        self, model: nn.Module, policy: Policy, variables: Mapping[str, float] | None
    ) -> None:
        self.variables = {**policy.vars, **_checked_overrides(policy, variables)}
        self.config = _model_config(model)

    def resolve(
        self,
        entry: TensorEntry,
        result: MatchResult,
        scheme: Scheme,
        shape: tuple[int, ...],
    ) -> SchemeArgs | PlanProblem:
        """Return the arguments for a tensor or block of ``shape``, or the problem.

        ``fan_in``, ``fan_out``, ``numel`` and ``shape`` in expressions are
        those of the block when a rule split the tensor.
        """
        init = result.rule.init
        if not init.expressions:
            return init.args
        values: dict[str, float] = dict(self.variables)
        for key, value in result.captures.items():
            if value.isascii() and value.isdigit():
                values[key] = int(value)
        names = set().union(*(e.names for e in init.expressions.values()))
        try:
            values.update(self._fans(entry, names, shape))
            values["numel"] = math.prod(shape)
            scope = Scope(values, shape, entry.module, self.config)
            evaluated = {
                key: expression.evaluate(scope)
                for key, expression in init.expressions.items()
            }
        except ExpressionError as error:
            return _problem(
                entry,
                result,
                f"argument expression failed: {error}",
                "fix the expression, or give the names it uses a value under 'vars'",
            )
        fields = scheme.args_model.model_fields
        for key, number in evaluated.items():
            # An integer argument takes a float result that is a whole number.
            annotation = fields[key].annotation
            takes_int = annotation is int or int in typing.get_args(annotation)
            if takes_int and float(number).is_integer():
                evaluated[key] = int(number)
        try:
            return scheme.args_model.model_validate(
                {**init.args.model_dump(warnings=False), **evaluated}
            )
        except ValidationError as error:
            shown = "; ".join(
                f"{'.'.join(map(str, detail['loc'])) or 'arguments'}: {detail['msg']}"
                for detail in error.errors()
            )
            values_text = ", ".join(
                f"{key}={value:.6g}" for key, value in evaluated.items()
            )
            return _problem(
                entry,
                result,
                f"the evaluated arguments ({values_text}) are invalid: {shown}",
                "change the expression so that it gives a valid value",
            )

    @staticmethod
    def _fans(
        entry: TensorEntry, names: set[str], shape: tuple[int, ...]
    ) -> dict[str, float]:
        """Return the module's true fans where known, else torch's convention.

        A tensor with fewer than 2 dimensions (a bias) gets the fans of its
        module's ``weight``, as torch's own bias init uses them.
        """
        if not names & {"fan_in", "fan_out"}:
            return {}
        local_name = entry.info.local_name
        if len(shape) < 2:
            weight = getattr(entry.module, "weight", None)
            if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
                raise ExpressionError(
                    f"fan_in and fan_out need a tensor with at least 2 dimensions, "
                    f"or one whose module has a weight with at least 2; got a "
                    f"{len(shape)}-D tensor of {type(entry.module).__name__}"
                )
            local_name, shape = "weight", tuple(weight.shape)
        fans = true_fans(entry.module, local_name, shape) or compute_fans(shape)
        return {"fan_in": fans[0], "fan_out": fans[1]}


def _checked_overrides(
    policy: Policy, variables: Mapping[str, float] | None
) -> dict[str, float]:
    """Return call-time vars, each declared by the policy and a finite number."""
    checked: dict[str, float] = {}
    for name, value in (variables or {}).items():
        if name not in policy.vars:
            declared = ", ".join(sorted(policy.vars)) or "none"
            raise PolicyError(
                f"var {name!r} is not declared in the policy's 'vars' (declared: "
                f"{declared}); declare it there to override it",
                path=policy.path,
            )
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PolicyError(
                f"var {name!r} must be a number, got {type(value).__name__}",
                path=policy.path,
            )
        try:
            finite = math.isfinite(value)
        except OverflowError:
            finite = False
        if not finite:
            raise PolicyError(
                f"var {name!r} must be a finite number that fits a float",
                path=policy.path,
            )
        checked[name] = value
    return checked


def _model_config(model: nn.Module) -> object | None:
    """Return the config of a transformers model (or its wrapper), if any."""
    config = None
    for prefix, module, _ in walk_modules(model):
        if prefix:
            break
        config = getattr(module, "config", None) or config
    return config


def _problem(
    entry: TensorEntry,
    result: MatchResult,
    reason: str,
    hint: str,
    chunk: Chunk | None = None,
) -> PlanProblem:
    dtype = str(entry.tensor.dtype).removeprefix("torch.")
    shape = tuple(entry.tensor.shape)
    block = f", {chunk} of shape {chunk.shape_of(shape)}" if chunk else ""
    detail = (
        f"cannot initialize {entry.name!r} (shape {shape}, {dtype}{block}): "
        f"{reason}; {hint}"
    )
    return PlanProblem(entry, result, reason, detail)


def _reject_meta(entries: list[TensorEntry]) -> None:
    meta = [entry.name for entry in entries if entry.tensor.is_meta]
    if meta:
        raise PlanError(
            f"{len(meta)} tensor(s) are on the meta device and hold no memory "
            f"(first: {meta[0]!r}); materialize the model first, for example with "
            "model.to_empty(device='cpu')"
        )


def _draw_problem(
    scheme: Scheme, args: SchemeArgs, shape: tuple[int, ...]
) -> str | None:
    """Return why a scheme's ``draw`` gives no distribution torch can sample, or None.

    Built-in schemes validate their arguments first, so this catches custom
    draw functions that raise or return invalid parameters.
    """
    assert scheme.draw is not None
    try:
        chosen = scheme.draw(shape, args)
    except Exception as error:
        return f"{scheme.name}'s draw failed: {type(error).__name__}: {error}"
    problem = chosen.problem()
    return None if problem is None else f"{scheme.name}'s draw is invalid: {problem}"


class _Verdicts:
    """Cached results of :meth:`Scheme.check` by scheme, arguments, shape and dtype.

    Thousands of tensors of a deep model share a few rules and shapes, and
    one check costs microseconds, so one plan runs each distinct check once.
    """

    def __init__(self) -> None:
        self._known: dict[
            tuple[int, int, tuple[int, ...], torch.dtype],
            tuple[Scheme, SchemeArgs, str | None, str],
        ] = {}

    def of(
        self,
        scheme: Scheme,
        args: SchemeArgs,
        shape: tuple[int, ...],
        dtype: torch.dtype,
    ) -> tuple[str | None, str]:
        """Return why the scheme cannot fill such a tensor (or ``None``), and a hint."""
        key = (id(scheme), id(args), shape, dtype)
        known = self._known.get(key)
        # The objects are kept and compared, since an id may be reused.
        if known is not None and known[0] is scheme and known[1] is args:
            return known[2], known[3]
        # Without arguments the check covers the tensor's kind (ndim, dtype); a
        # failure that appears only with them is about the rule's arguments.
        reason = scheme.check(shape, dtype)
        hint = (
            "narrow the rule's match (for example with 'ndim' or 'param') or add an "
            "earlier rule for this tensor"
        )
        if reason is None:
            reason = scheme.check(shape, dtype, args)
            hint = "change the rule's arguments, or use another scheme for this tensor"
        if reason is None and scheme.draw is not None:
            reason = _draw_problem(scheme, args, shape)
        self._known[key] = (scheme, args, reason, hint)
        return reason, hint


def _check(
    entry: TensorEntry,
    result: MatchResult,
    scheme: Scheme,
    args: SchemeArgs,
    shape: tuple[int, ...],
    chunk: Chunk | None,
    verdicts: _Verdicts,
) -> PlanProblem | None:
    reason, hint = verdicts.of(scheme, args, shape, entry.tensor.dtype)
    if reason is None and entry.parametrization is not None:
        reason = _parametrization_problem(entry.parametrization, scheme)
        hint = "choose another scheme, or remove the parametrization before init"
    needs_reset = scheme.needs_module_reset
    if reason is None and needs_reset and not _has_reset(entry.module):
        reason = (
            f"{scheme.name} needs the owning module to define "
            f"reset_parameters(), and {type(entry.module).__name__} does not"
        )
        hint = "choose another scheme for this tensor"
    if reason is None:
        return None
    return _problem(entry, result, reason, hint, chunk)


def _parametrization_problem(
    chain: parametrize.ParametrizationList, scheme: Scheme
) -> str | None:
    """Return why a scheme cannot write through a parametrization, or ``None``."""
    if scheme.needs_module_reset or scheme.needs_data:
        return (
            f"{scheme.name} writes the module's tensor in place, and a parametrized "
            "tensor is computed anew on every access, so the write would be lost"
        )
    if not scheme.writes:
        return None
    for step in chain:
        if not hasattr(step, "right_inverse"):
            return (
                f"the parametrization {type(step).__name__} has no right_inverse, so "
                "no value can be written through it"
            )
    return None


def _has_reset(module: nn.Module) -> bool:
    return callable(getattr(module, "reset_parameters", None))


def _raise_problems(problems: list[str]) -> None:
    shown = "\n".join(f"  {problem}" for problem in problems[:20])
    if len(problems) > 20:
        shown += f"\n  ... and {len(problems) - 20} more"
    if len(problems) == 1:
        raise PlanError(problems[0])
    raise PlanError(f"{len(problems)} tensors cannot be initialized:\n{shown}")
