"""Initialization of DTensor parameters (FSDP2 and other layouts), shard by shard.

A model sharded with ``torch.distributed.fsdp.fully_shard`` or with DTensor
placements stores each parameter as a DTensor: every rank stores one box of
the global tensor. initrules writes each rank's box with exactly the values
a single-process ``apply`` with the same seed gives that box, so the weights
depend on the policy, the seed and the tensor's name alone, never on the
number of ranks or the layout:

* An elementwise random draw (normal, uniform, truncated normal and the
  fan-scaled schemes built on them) of more than ``CHUNK_ELEMENTS`` values
  draws only the chunks of the tensor's seeded stream (see
  :mod:`initrules.stream`) that cover the rank's elements, in the tensor's
  global row-major order. Under ``Shard(0)`` that is about the rank's share
  of the tensor; under ``Shard(1)`` a rank's rows are spread over the whole
  tensor, so it draws most of it.
* Schemes that fill every element with one value write the shard directly.
* Every other case (orthogonal, sparse, eye, dirac, small tensors, tensors
  split into chunks by a rule, pretrained) builds the whole tensor on every
  rank and keeps the box: a full tensor's memory per rank, one tensor at a
  time. No torch init function runs on a DTensor itself, since some (eye)
  corrupt the shard silently.

Statistics in the report are those of the global tensor, reduced across
ranks; a replicated shard counts once. Collectives use the default process
group, which must hold every rank of the parameters' meshes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from initrules.checks import CANCELLATION_RATIO, Measured, sum_of_squares
from initrules.errors import ApplyError, PlanError
from initrules.planner import Plan, PlannedTensor
from initrules.stream import CHUNK_ELEMENTS, Draw, draw_range

__all__ = [
    "Box",
    "agree_on_failure",
    "agree_on_plan",
    "fill_sharded",
    "global_view",
    "has_process_group",
    "is_plain",
    "is_sharded",
    "measure_sharded",
    "on_tensor",
    "rank",
]

logger = logging.getLogger(__name__)


def is_sharded(tensor: torch.Tensor) -> bool:
    """Return True for a DTensor (a parameter sharded or replicated over a mesh)."""
    return isinstance(tensor, DTensor)


def has_process_group() -> bool:
    """Return True if the default process group exists.

    DTensors and FSDP2 modules live on a device mesh, which needs it, so
    without one no tensor is sharded.
    """
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Return this process's rank, or 0 without a process group."""
    return dist.get_rank() if has_process_group() else 0


@dataclass(frozen=True)
class Box:
    """This rank's box of a DTensor.

    Attributes:
        local: The rank's values, a plain tensor that writes go into.
        offset: Global index of the box's first element, per dimension.
        owner: True if the box counts in global statistics: a box
            replicated over a mesh dimension counts on coordinate 0 only.
    """

    local: torch.Tensor
    offset: tuple[int, ...]
    owner: bool

    @classmethod
    def of(cls, tensor: DTensor) -> Box:
        """Return the box of ``tensor`` that this rank stores."""
        mesh = tensor.device_mesh
        shape, offset = compute_local_shape_and_global_offset(
            tensor.shape, mesh, tensor.placements
        )
        local = tensor.to_local()
        if tuple(local.shape) != tuple(shape):
            raise PlanError(
                f"a DTensor's local shard has shape {tuple(local.shape)}, but its "
                f"placements {tensor.placements} give {tuple(shape)}; initrules "
                "supports Shard(d) and Replicate() placements"
            )
        coordinate = tuple(mesh.get_coordinate() or ())
        owner = all(
            index == 0
            for index, placement in zip(coordinate, tensor.placements, strict=True)
            if not placement.is_shard()
        )
        return cls(local, tuple(offset), owner)

    def window(self, full: torch.Tensor) -> torch.Tensor:
        """Return the box as a view of a tensor of the global shape."""
        view = full
        for dim, (start, size) in enumerate(
            zip(self.offset, self.local.shape, strict=True)
        ):
            view = view.narrow(dim, start, size)
        return view


FillFn = Callable[[PlannedTensor, int | None], int]
PaddingFn = Callable[[PlannedTensor], int | None]


def is_plain(tensor: torch.Tensor) -> bool:
    """Return True if every placement is ``Shard(d)`` or ``Replicate()``.

    The rank's part of such a tensor is one box, so it can be drawn and
    measured alone. Other placements (strided shards) go through the whole
    tensor.
    """
    assert isinstance(tensor, DTensor)
    return all(type(placement) in (Shard, Replicate) for placement in tensor.placements)


def fill_sharded(
    items: list[PlannedTensor], seed: int | None, fill: FillFn, padding: PaddingFn
) -> int:
    """Write this rank's part of one DTensor; return the rows zeroed after a draw.

    ``items`` are the plan's items of one tensor (one, or one per block),
    ``fill`` writes one item into a plain tensor as a single process would,
    and ``padding`` returns the embedding row zeroed after an item's draw.
    The returned count is the same on every rank, whatever its part contains.
    """
    first = items[0]
    tensor = first.entry.tensor
    assert isinstance(tensor, DTensor)
    zeroed = 1 if any(padding(item) is not None for item in items) else 0
    if not any(item.scheme.writes for item in items):
        return zeroed
    box = Box.of(tensor) if is_plain(tensor) else None
    if box is not None and box.local.numel() == 0:
        return zeroed
    draw = first.scheme.draw
    whole = len(items) == 1 and first.chunk is None
    large = tensor.numel() > CHUNK_ELEMENTS
    if box is not None and whole and seed is not None and draw is not None and large:
        _draw_box(box, tuple(tensor.shape), draw(first.shape, first.args), seed, first)
        row = padding(first)
        if row is not None and box.offset[0] <= row < box.offset[0] + len(box.local):
            box.local[row - box.offset[0]].zero_()
        return zeroed
    if box is not None and whole and first.scheme.constant:
        fill(on_tensor(first, box.local), seed)
        return zeroed
    full = torch.empty(
        tensor.shape, dtype=tensor.dtype, device=tensor.to_local().device
    )
    if box is not None:
        # A block that a rule keeps keeps the rank's values.
        box.window(full).copy_(box.local)
    for item in items:
        fill(on_tensor(item, full), seed)
    if box is not None:
        box.local.copy_(box.window(full))
    else:
        # torch's own slicing needs no communication, since every rank has `full`.
        part = distribute_tensor(
            full, tensor.device_mesh, tensor.placements, src_data_rank=None
        )
        tensor.to_local().copy_(part.to_local())
    return zeroed


def on_tensor(item: PlannedTensor, tensor: torch.Tensor) -> PlannedTensor:
    """Return ``item`` writing into ``tensor`` instead of its own tensor."""
    return replace(item, entry=replace(item.entry, tensor=tensor))


def _draw_box(
    box: Box,
    shape: tuple[int, ...],
    draw: Draw,
    seed: int,
    item: PlannedTensor,
) -> None:
    """Draw the stream elements of the box, with the values one process draws.

    A box of whole rows (``Shard(0)``) is one run of the stream, drawn
    straight into the shard. Any other box draws the run from its first to
    its last element and copies the box out of it.
    """
    strides = [math.prod(shape[dim + 1 :]) for dim in range(len(shape))]
    start = sum(o * s for o, s in zip(box.offset, strides, strict=True))
    total = math.prod(shape)
    local = box.local
    rows_only = (
        all(o == 0 for o in box.offset[1:]) and tuple(local.shape[1:]) == (shape[1:])
    )
    if rows_only and local.is_contiguous():
        draw_range(local.view(-1), start, total, draw, seed, item.label)
        return
    last = start + sum(
        (size - 1) * s for size, s in zip(local.shape, strides, strict=True)
    )
    run = torch.empty(last + 1 - start, dtype=local.dtype, device=local.device)
    draw_range(run, start, total, draw, seed, item.label)
    local.copy_(run.as_strided(tuple(local.shape), strides))


def measure_sharded(tensors: list[torch.Tensor]) -> list[Measured | None]:
    """Return the global mean, std, min and max of DTensors, reduced across ranks.

    Each rank sums its values and their squares as :func:`initrules.checks.measure`
    does (blocked float32 norms summed in float64), and one pair of
    collectives reduces every tensor's sums at once. When a mean is large
    against the spread, a second pass sums squared deviations from the global
    mean instead, so the std keeps its digits.
    """
    parts = [_local_sums(tensor) for tensor in tensors]
    sums = torch.tensor([part[0] for part in parts], dtype=torch.float64)
    extremes = torch.tensor([part[1] for part in parts], dtype=torch.float64)
    if parts:
        dist.all_reduce(sums)
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
    measured: list[Measured | None] = []
    again: list[int] = []
    for index, tensor in enumerate(tensors):
        count, total, squares = (float(value) for value in sums[index])
        if count == 0 or not _measurable(tensor):
            measured.append(None)
            continue
        mean = total / count
        low, high = -float(extremes[index][1]), float(extremes[index][0])
        if count < 2 or not math.isfinite(mean):
            std = 0.0 if count < 2 else math.nan
            measured.append(Measured(mean, std, low, high))
            continue
        centered = squares - count * mean * mean
        if count * mean * mean > CANCELLATION_RATIO * max(centered, 0.0):
            again.append(index)
        measured.append(Measured(mean, _std(centered, count), low, high))
    if again:
        # Every rank decides alike: the test uses global sums only.
        deviations = torch.tensor(
            [_local_deviations(tensors[index], measured[index]) for index in again],
            dtype=torch.float64,
        )
        dist.all_reduce(deviations)
        for index, centered in zip(again, deviations.tolist(), strict=True):
            found = measured[index]
            assert found is not None
            count = float(sums[index][0])
            measured[index] = Measured(
                found.mean, _std(centered, count), found.min, found.max
            )
    return measured


def _measurable(tensor: torch.Tensor) -> bool:
    return not (tensor.dtype == torch.bool or tensor.is_complex())


def _std(centered: float, count: float) -> float:
    return math.sqrt(max(centered, 0.0) / (count - 1))


def _owned_values(tensor: torch.Tensor) -> torch.Tensor:
    """Return this rank's values that count in global statistics, flat."""
    assert isinstance(tensor, DTensor)
    shard = Box.of(tensor)
    values = shard.local.detach().reshape(-1)
    if not shard.owner or not _measurable(tensor):
        return values[:0].float()
    if not values.is_floating_point() or values.dtype.itemsize < 4:
        values = values.float()
    return values


def _local_sums(tensor: torch.Tensor) -> tuple[list[float], list[float]]:
    values = _owned_values(tensor)
    if values.numel() == 0:
        return [0.0, 0.0, 0.0], [-math.inf, -math.inf]
    low, high = torch.aminmax(values)
    sums = [
        float(values.numel()),
        float(values.sum(dtype=torch.float64)),
        sum_of_squares(values),
    ]
    return sums, [float(high), -float(low)]


def _local_deviations(tensor: torch.Tensor, measured: Measured | None) -> float:
    values = _owned_values(tensor)
    if values.numel() == 0 or measured is None:
        return 0.0
    return sum_of_squares(values - measured.mean)


def global_view(tensor: torch.Tensor) -> torch.Tensor:
    """Return the whole tensor on every rank (a collective)."""
    assert isinstance(tensor, DTensor)
    return tensor.full_tensor()


def agree_on_plan(plan: Plan | None, error: Exception | None, seed: int | None) -> None:
    """Check that every rank made the same plan; raise on every rank if not.

    A rank that failed to plan takes part with its error, so that no rank
    waits forever in a later collective for one that raised.

    Raises:
        PlanError: The ranks' plans (or errors) differ.
    """
    text = _plan_text(plan) if plan is not None else f"error: {error}"
    text += f"\nseed {seed}"
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    value = int.from_bytes(digest, "little") & ((1 << 62) - 1)
    world = dist.get_world_size()
    table = torch.zeros(world, dtype=torch.int64)
    table[dist.get_rank()] = value
    dist.all_reduce(table)
    groups: dict[int, list[int]] = {}
    for index, found in enumerate(table.tolist()):
        groups.setdefault(found, []).append(index)
    if len(groups) > 1:
        shown = "; ".join(
            f"{'rank' if len(ranks) == 1 else 'ranks'} {', '.join(map(str, ranks))}"
            for ranks in groups.values()
        )
        raise PlanError(
            f"the ranks made {len(groups)} different plans, one per group ({shown}); "
            "every rank must plan the same tensors with the same rules, arguments "
            "and seed, so check for a seed, vars, config values or module "
            "attributes that differ between ranks"
            + (f" (this rank: {error})" if error is not None else "")
        )


def agree_on_failure(error: Exception | None) -> None:
    """Raise on every rank if writing failed on any (a collective).

    Ranks write without collectives, so one that fails must not leave the
    others waiting in the report's reductions.

    Raises:
        ApplyError: Some rank failed; this rank's own error, or which ranks
            failed.
    """
    flags = torch.zeros(dist.get_world_size(), dtype=torch.int64)
    flags[dist.get_rank()] = 1 if error is not None else 0
    dist.all_reduce(flags)
    failed = [index for index, flag in enumerate(flags.tolist()) if flag]
    if not failed:
        return
    if isinstance(error, ApplyError):
        raise error
    if error is not None:
        raise ApplyError(
            f"writing failed on this rank: {type(error).__name__}: {error}"
        )
    raise ApplyError(
        f"writing failed on rank(s) {', '.join(map(str, failed))}; this rank wrote "
        "its shards, so the model is partly initialized"
    )


def _plan_text(plan: Plan) -> str:
    """Return a text that differs whenever two plans would write differently."""
    parts = [
        json.dumps(
            [
                item.label,
                item.match.rule_index,
                item.scheme.name,
                item.args.model_dump(mode="json"),
            ],
            default=str,
        )
        for item in plan.planned
    ]
    parts += [f"unmatched {entry.name}" for entry in plan.unmatched]
    parts += [f"skipped {item.entry.name}" for item in plan.skipped]
    return "\n".join(parts)
