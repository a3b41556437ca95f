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

__all__ = ["CHUNK_ELEMENTS", "Draw", "derive_seed", "draw_chunks", "fill_chunked"]

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
        if self.kind == "normal":
            nn.init.normal_(out, self.first, self.second, generator=generator)
        elif self.kind == "uniform":
            nn.init.uniform_(out, self.first, self.second, generator=generator)
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
    draw_chunks(flat, 0, draw, seed, name)
    if target is not tensor:
        tensor.copy_(target)


def draw_chunks(
    out: torch.Tensor, first: int, draw: Draw, seed: int, name: str
) -> None:
    """Draw consecutive chunks of ``name``'s stream into the 1-D tensor ``out``.

    ``out`` holds the tensor's elements from ``first * CHUNK_ELEMENTS`` on,
    in row-major order; it may end inside a chunk only where the tensor
    does. A rank that holds one shard of a tensor draws just the chunks
    that cover its elements this way.
    """
    count = math.ceil(out.numel() / CHUNK_ELEMENTS)
    narrow = out.dtype.itemsize < 4

    @torch.no_grad()
    def fill_one(index: int) -> None:
        piece = out[index * CHUNK_ELEMENTS : (index + 1) * CHUNK_ELEMENTS]
        generator = torch.Generator(device=out.device)
        generator.manual_seed(derive_seed(seed, name, first + index))
        if narrow:
            scratch = torch.empty(piece.shape, dtype=torch.float32, device=piece.device)
            draw.sample_(scratch, generator)
            piece.copy_(scratch)
        else:
            draw.sample_(piece, generator)

    workers = min(torch.get_num_threads(), count) if out.device.type == "cpu" else 1
    if workers <= 1:
        for index in range(count):
            fill_one(index)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            # list() re-raises the first exception a chunk raised.
            list(pool.map(fill_one, range(count)))
