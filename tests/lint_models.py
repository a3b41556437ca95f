"""Small models for the lint and command-line tests.

Each factory takes keyword arguments only, as ``--model MODULE:FACTORY``
expects, and builds on whatever device context it is called in (the command
line uses the meta device for ``lint`` and ``explain``). The lint fixtures
name their factory in a leading comment such as
``# model: tests.lint_models:tiny_mlp``. transformers is imported inside the
factories that need it, so importing this module stays cheap.
"""

from __future__ import annotations

import os

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tiny_mlp() -> nn.Module:
    """Return ``Linear(4, 8)``, ``ReLU``, ``Linear(8, 2)`` in a Sequential.

    Tensors: ``0.weight`` (8x4), ``0.bias`` (8), ``2.weight`` (2x8),
    ``2.bias`` (2).
    """
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


class TiedLM(nn.Module):
    """An embedding, a projection, and an output head tied to the embedding.

    Module order puts ``embed.weight`` first, so it is the canonical name of
    the tied tensor and ``head.weight`` is its alias.
    """

    def __init__(self, vocab_size: int = 10, width: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)
        self.proj = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab_size, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.proj(self.embed(tokens))))


def tied_lm() -> nn.Module:
    """Return a :class:`TiedLM` with a vocabulary of 10 and width 4."""
    return TiedLM()


def meta_only_mlp() -> nn.Module:
    """Return :func:`tiny_mlp`, or raise when not called under the meta device.

    The command-line tests use it to check that ``lint`` and ``explain``
    build their model without allocating weights.
    """
    model = tiny_mlp()
    if not all(parameter.is_meta for parameter in model.parameters()):
        raise RuntimeError("meta_only_mlp was built outside the meta device")
    return model


class ResidualProjection(nn.Module):
    """transformers' ``Conv1D`` projection under another class name.

    It has the same ``weight`` (in_features x out_features) and ``bias``
    tensors and computes the same output.
    """

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.out_features = conv.nf
        self.weight = conv.weight
        self.bias = conv.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (*x.shape[:-1], self.out_features)
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(
            shape
        )


def gpt2_renamed_projections(n_layer: int = 12) -> nn.Module:
    """Return a small GPT2LMHeadModel whose ``c_proj`` layers are renamed.

    Each ``attn.c_proj`` and ``mlp.c_proj`` (a ``Conv1D``) is replaced by a
    :class:`ResidualProjection` registered as ``out_proj``, as a port of
    GPT-2 to another code base might name it. ``policies/gpt2.yaml`` then
    has a rule (``**.c_proj.weight`` on ``Conv1D``) that matches nothing, and
    the projection weights match no rule; the biases still match ``param:
    bias``. The forward pass keeps working because the projection is also
    stored as a plain ``c_proj`` attribute, outside ``_modules``.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=n_layer,
        n_embd=8,
        n_head=2,
        vocab_size=32,
        n_positions=16,
        bos_token_id=31,
        eos_token_id=31,
    )
    model = GPT2LMHeadModel(config)
    for block in model.transformer.h:
        for parent in (block.attn, block.mlp):
            projection = ResidualProjection(parent.c_proj)
            del parent.c_proj
            parent.out_proj = projection
            # nn.Module.__setattr__ would register a second child; a plain
            # attribute keeps `self.c_proj(...)` in forward() working.
            object.__setattr__(parent, "c_proj", projection)
    return model


def lazy_mlp() -> nn.Module:
    """Return ``Linear(4, 8)`` then a ``LazyLinear(2)`` with no shape yet."""
    return nn.Sequential(nn.Linear(4, 8), nn.LazyLinear(2))
