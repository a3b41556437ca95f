"""The seeded stream: which generator draws which elements of a tensor.

With a seed, every tensor draws from generators seeded from the run's seed
and the tensor's canonical name alone, so its values do not depend on other
tensors, on rule order, or on the number of threads. The format is fixed:

* A tensor of at most ``CHUNK_ELEMENTS`` elements is drawn in one piece
  from a generator seeded with ``derive_seed(seed, name)``.
* A larger tensor drawn elementwise (normal, uniform, truncated normal and
  the fan-based schemes built on them) is split, in row-major element order,
  into chunks of ``CHUNK_ELEMENTS`` (the last one shorter). Chunk ``i`` is
  drawn from a generator seeded with ``derive_seed(seed, name, i)``. Chunks
  are independent, so they are drawn on up to ``torch.get_num_threads()``
  threads with the same result as one thread, and :func:`draw_all` spreads
  the chunks and small tensors of many tensors over one such pool.
* Schemes that need the whole matrix (orthogonal, sparse, eye, dirac) draw
  it in one piece, as in the first case.

Changing any of this changes every seeded result, so a golden test pins a
digest of a few seeded tensors.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

__all__ = [
    "CHUNK_ELEMENTS",
    "Draw",
    "DrawJob",
    "DrawJobError",
    "derive_seed",
    "draw_all",
    "draw_range",
    "fill_chunked",
]

CHUNK_ELEMENTS = 1 << 20
"""Elements per chunk of the seeded stream; part of its format, never tuned."""

ChunkHook = Callable[[int, torch.Tensor], None]
"""Called with a chunk's index and its values right after they are drawn."""


def derive_seed(seed: int, name: str, chunk: int | None = None) -> int:
    """Return the 63-bit seed of a tensor, or of one chunk of it.

    The value depends only on these inputs (a BLAKE2b digest), so a tensor's
    draw does not change when other rules or tensors are added, removed or
    reordered.
    """
    text = f"{seed}\x00{name}" if chunk is None else f"{seed}\x00{name}\x00{chunk}"
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class Draw:
    """An elementwise distribution, resolved for one tensor's shape.

    Attributes:
        kind: ``normal`` (``first`` is the mean, ``second`` the std),
            ``uniform`` (bounds ``first`` and ``second``), or
            ``trunc_normal`` (a normal truncated to ``[low, high]``).
        first: Mean or lower bound.
        second: Standard deviation or upper bound.
        low: Lower truncation bound of ``trunc_normal``.
        high: Upper truncation bound of ``trunc_normal``.
    """

    kind: Literal["normal", "uniform", "trunc_normal"]
    first: float
    second: float
    low: float = -math.inf
    high: float = math.inf

    def problem(self) -> str | None:
        """Return why torch cannot sample this distribution, or ``None`` if it can."""
        if not (math.isfinite(self.first) and math.isfinite(self.second)):
            return (
                f"the {self.kind} draw has parameters {self.first!r} and "
                f"{self.second!r}, and both must be finite"
            )
        if self.kind == "uniform":
            if self.first > self.second:
                return (
                    f"the uniform draw has a = {self.first!r} above b = {self.second!r}"
                )
            return None
        if self.second < 0:
            return f"the {self.kind} draw has a negative std, {self.second!r}"
        if self.kind == "trunc_normal" and not self.low < self.high:
            return (
                f"the trunc_normal draw has bounds a = {self.low!r} and b = "
                f"{self.high!r}, and needs a < b"
            )
        return None

    def sample_(self, out: torch.Tensor, generator: torch.Generator | None) -> None:
        """Fill ``out`` in place from ``generator``, or torch's global one if None."""
        if torch.is_grad_enabled():
            with torch.no_grad():
                self.sample_(out, generator)
            return
        # The tensor methods that torch.nn.init calls, without its per-call
        # wrappers, because deep models fill thousands of small tensors.
        if self.kind == "normal":
            out.normal_(self.first, self.second, generator=generator)
        elif self.kind == "uniform":
            out.uniform_(self.first, self.second, generator=generator)
        else:
            nn.init.trunc_normal_(
                out, self.first, self.second, self.low, self.high, generator=generator
            )


def fill_chunked(
    tensor: torch.Tensor,
    draw: Draw,
    seed: int,
    name: str,
    on_chunk: ChunkHook | None = None,
) -> None:
    """Fill ``tensor`` chunk by chunk from the seeded stream of ``name``.

    Chunks run on a thread pool no larger than ``torch.get_num_threads()``
    on the CPU, one after another on other devices; the values are the same
    either way. Dtypes narrower than float32 are drawn in float32 and
    rounded once, chunk by chunk. ``on_chunk(index, values)``, when given,
    runs on each chunk's thread right after the chunk is written, while its
    values are still in the cache.
    """
    target = (
        tensor
        if tensor.is_contiguous()
        else torch.empty_like(tensor, memory_format=torch.contiguous_format)
    )
    # Grad mode is per thread, so the workers write through a detached view.
    flat = target.detach().view(-1)
    draw_range(flat, 0, flat.numel(), draw, seed, name, on_chunk)
    if target is not tensor:
        tensor.copy_(target)


def draw_range(
    out: torch.Tensor,
    start: int,
    total: int,
    draw: Draw,
    seed: int,
    name: str,
    on_chunk: ChunkHook | None = None,
) -> None:
    """Draw elements ``start`` to ``start + len(out)`` of a stream into ``out``.

    The stream covers a tensor of ``total`` elements in row-major order.
    Chunks that lie wholly inside the range are drawn straight into
    ``out``; the one or two it only partly covers are drawn whole and cut.
    A rank that stores one shard of a tensor draws just its elements this
    way, with the values a single process draws for them.
    """
    end = start + out.numel()
    chunks = range(start // CHUNK_ELEMENTS, math.ceil(end / CHUNK_ELEMENTS))

    def fill_one(chunk: int) -> None:
        _draw_chunk(out, start, total, chunk, draw, seed, name, on_chunk)

    workers = (
        min(torch.get_num_threads(), len(chunks)) if out.device.type == "cpu" else 1
    )
    if workers <= 1:
        for chunk in chunks:
            fill_one(chunk)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            # list() re-raises the first exception a chunk raised.
            list(pool.map(fill_one, chunks))


@torch.no_grad()
def _draw_chunk(
    out: torch.Tensor,
    start: int,
    total: int,
    chunk: int,
    draw: Draw,
    seed: int,
    name: str,
    on_chunk: ChunkHook | None,
) -> None:
    """Draw the part of chunk ``chunk`` that ``out`` covers, as draw_range describes."""
    end = start + out.numel()
    first = chunk * CHUNK_ELEMENTS
    last = min(first + CHUNK_ELEMENTS, total)
    low, high = max(first, start), min(last, end)
    generator = torch.Generator(device=out.device)
    generator.manual_seed(derive_seed(seed, name, chunk))
    piece = out[low - start : high - start]
    narrow = out.dtype.itemsize < 4
    if (low, high) == (first, last) and not narrow:
        draw.sample_(piece, generator)
    else:
        wide = torch.float32 if narrow else out.dtype
        scratch = torch.empty(last - first, dtype=wide, device=out.device)
        draw.sample_(scratch, generator)
        piece.copy_(scratch[low - first : high - first])
    if on_chunk is not None:
        on_chunk(chunk, piece)


def _draw_whole(
    out: torch.Tensor, draw: Draw, seed: int, name: str, generator: torch.Generator
) -> None:
    """Draw a tensor of at most one chunk from its single generator.

    ``generator`` is reseeded here, which resets its whole state, so one
    generator serves a thread's tensors one after another. Call it under
    ``torch.no_grad()``, as :func:`draw_all` does once per task.
    """
    generator.manual_seed(derive_seed(seed, name))
    if out.dtype.itemsize >= 4:
        draw.sample_(out, generator)
        return
    scratch = torch.empty(out.shape, dtype=torch.float32, device=out.device)
    draw.sample_(scratch, generator)
    out.copy_(scratch)


@dataclass(frozen=True)
class DrawJob:
    """A tensor for :func:`draw_all` to fill from its seeded stream.

    Attributes:
        out: The tensor, contiguous and on the CPU.
        draw: Its distribution.
        name: The stream's name: the tensor's canonical name, or a block's label.
        on_chunk: Called after each chunk is drawn, as in
            :func:`fill_chunked`. A tensor of at most one chunk is chunk 0.
    """

    out: torch.Tensor
    draw: Draw
    name: str
    on_chunk: ChunkHook | None = None


class DrawJobError(Exception):
    """A job of :func:`draw_all` failed; the cause is chained.

    Attributes:
        index: The position of the failed job.
    """

    def __init__(self, index: int) -> None:
        super().__init__(f"draw job {index} failed")
        self.index = index


def draw_all(jobs: Sequence[DrawJob], seed: int) -> None:
    """Fill every job's tensor from its seeded stream, on one shared thread pool.

    Each tensor gets the values :func:`fill_chunked` gives a tensor of more
    than one chunk, and the single generator draw otherwise. The work is
    cut into tasks of about one chunk (one chunk of a large tensor, or a run
    of small tensors), so that threads stay busy across tensors of uneven
    sizes. The pool has at most ``torch.get_num_threads()`` threads.

    Raises:
        DrawJobError: A job failed; others may have been drawn.
    """
    tasks: list[list[tuple[int, int | None]]] = []
    size = CHUNK_ELEMENTS
    for index, job in enumerate(jobs):
        count = job.out.numel()
        units: list[tuple[int, int | None]]
        if count > CHUNK_ELEMENTS:
            units = [
                (index, chunk) for chunk in range(math.ceil(count / CHUNK_ELEMENTS))
            ]
        else:
            units = [(index, None)]
        for unit in units:
            if size >= CHUNK_ELEMENTS:
                tasks.append([])
                size = 0
            tasks[-1].append(unit)
            size += min(count, CHUNK_ELEMENTS)

    @torch.no_grad()
    def run(task: list[tuple[int, int | None]]) -> None:
        # Every job is on the CPU, as DrawJob requires.
        generator = torch.Generator()
        for index, chunk in task:
            job = jobs[index]
            try:
                if chunk is None:
                    _draw_whole(job.out, job.draw, seed, job.name, generator)
                    if job.on_chunk is not None:
                        job.on_chunk(0, job.out.detach().view(-1))
                else:
                    flat = job.out.detach().view(-1)
                    _draw_chunk(
                        flat,
                        0,
                        flat.numel(),
                        chunk,
                        job.draw,
                        seed,
                        job.name,
                        job.on_chunk,
                    )
            except Exception as error:
                raise DrawJobError(index) from error

    workers = min(torch.get_num_threads(), len(tasks))
    if workers <= 1:
        for task in tasks:
            run(task)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        # list() re-raises the first exception a task raised.
        list(pool.map(run, tasks))
