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
  threads with the same result as one thread.
* Schemes that need the whole matrix (orthogonal, sparse, eye, dirac) draw
  it in one piece, as in the first case.

Changing any of this changes every seeded result, so a golden test pins a
digest of a few seeded tensors.
"""

from __future__ import annotations

import hashlib
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

__all__ = ["CHUNK_ELEMENTS", "Draw", "derive_seed", "draw_range", "fill_chunked"]

CHUNK_ELEMENTS = 1 << 20
"""Elements per chunk of the seeded stream; part of its format, never tuned."""


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

    def sample_(self, out: torch.Tensor, generator: torch.Generator | None) -> None:
        """Fill ``out`` in place from ``generator``, or torch's global one if None."""
        if torch.is_grad_enabled():
            with torch.no_grad():
                self.sample_(out, generator)
            return
        # The tensor methods, as torch.nn.init calls them, without its
        # per-call wrappers: deep models fill thousands of small tensors.
        if self.kind == "normal":
            out.normal_(self.first, self.second, generator=generator)
        elif self.kind == "uniform":
            out.uniform_(self.first, self.second, generator=generator)
        else:
            nn.init.trunc_normal_(
                out, self.first, self.second, self.low, self.high, generator=generator
            )


def fill_chunked(tensor: torch.Tensor, draw: Draw, seed: int, name: str) -> None:
    """Fill ``tensor`` chunk by chunk from the seeded stream of ``name``.

    Chunks run on a thread pool no larger than ``torch.get_num_threads()``
    on the CPU, one after another on other devices; the values are the same
    either way. Dtypes narrower than float32 are drawn in float32 and
    rounded once, chunk by chunk.
    """
    target = (
        tensor
        if tensor.is_contiguous()
        else torch.empty_like(tensor, memory_format=torch.contiguous_format)
    )
    # Grad mode is per thread, so the workers write through a detached view.
    flat = target.detach().view(-1)
    draw_range(flat, 0, flat.numel(), draw, seed, name)
    if target is not tensor:
        tensor.copy_(target)


def draw_range(
    out: torch.Tensor, start: int, total: int, draw: Draw, seed: int, name: str
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
    narrow = out.dtype.itemsize < 4

    @torch.no_grad()
    def fill_one(chunk: int) -> None:
        first = chunk * CHUNK_ELEMENTS
        last = min(first + CHUNK_ELEMENTS, total)
        low, high = max(first, start), min(last, end)
        generator = torch.Generator(device=out.device)
        generator.manual_seed(derive_seed(seed, name, chunk))
        piece = out[low - start : high - start]
        if (low, high) == (first, last) and not narrow:
            draw.sample_(piece, generator)
            return
        wide = torch.float32 if narrow else out.dtype
        scratch = torch.empty(last - first, dtype=wide, device=out.device)
        draw.sample_(scratch, generator)
        piece.copy_(scratch[low - first : high - first])

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
