"""The ``pretrained`` scheme: copy a tensor from a checkpoint file.

A rule such as ``init: {scheme: pretrained, path: encoder.pt, prefix:
{"encoder.": "model.encoder."}}`` fills each tensor it wins with the
checkpoint's tensor of the same name, after the prefix mapping. The planner
opens each file once and checks every key, shape and dtype before anything
is written. A missing key, a wrong shape or a dtype that cannot be cast is
a PlanError.

Files ending in ``.safetensors`` are read with the safetensors package
(``pip install safetensors``); any other file with ``torch.load(...,
weights_only=True)``, memory-mapped where the format allows, so a large
checkpoint is not read into memory at once.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, field_validator

from initrules.schemes import FillContext, Scheme, SchemeArgs, register_scheme

__all__ = ["Checkpoints", "PretrainedArgs"]


class PretrainedArgs(SchemeArgs):
    """Arguments of ``pretrained``.

    Attributes:
        path: The checkpoint file, relative to the policy file that contains
            the rule (to the working directory for a policy without a file).
        prefix: Maps the start of a tensor's canonical name to the start of
            its checkpoint key; the longest matching prefix applies.
        key: The checkpoint key to read, for a rule that wins one tensor;
            set in the report to the key each tensor was read from.
    """

    path: str = Field(min_length=1)
    prefix: dict[str, str] = {}
    key: str | None = None

    @field_validator("path")
    @classmethod
    def _no_nul(cls, value: str) -> str:
        if "\0" in value:
            raise ValueError("path must not contain a NUL character")
        return value


Source = Callable[[], torch.Tensor]


class _Opened:
    """One checkpoint file: its keys and shapes, and a way to read a tensor."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tensors: Mapping[str, Any]
        self._safe: Any = None
        if path.suffix == ".safetensors":
            try:
                from safetensors import safe_open
            except ImportError:
                raise ValueError(
                    f"reading {path} needs the safetensors package; install it with "
                    "pip install safetensors"
                ) from None
            self._safe = safe_open(str(path), framework="pt")
            self.shapes = {
                key: tuple(self._safe.get_slice(key).get_shape())
                for key in self._safe.keys()  # noqa: SIM118 (not a dict)
            }
            return
        loaded = _load_torch(path)
        if not isinstance(loaded, Mapping) or not all(
            isinstance(key, str) and isinstance(value, torch.Tensor)
            for key, value in loaded.items()
        ):
            raise ValueError(
                f"{path} does not hold a state dict (a mapping of names to tensors); "
                "save one with torch.save(model.state_dict(), path)"
            )
        self._tensors = loaded
        self.shapes = {key: tuple(value.shape) for key, value in loaded.items()}

    def reader(self, key: str) -> Source:
        """Return a function that reads the tensor stored under ``key``."""
        if self._safe is not None:
            safe = self._safe
            return lambda: safe.get_tensor(key)
        tensor = self._tensors[key]
        return lambda: tensor


def _load_torch(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as error:
        # Files in torch's legacy (non-zip) format cannot be memory-mapped.
        if "mmap" not in str(error):
            raise
    return torch.load(path, map_location="cpu", weights_only=True)


class Checkpoints:
    """The checkpoint files one plan reads, each opened once.

    ``source`` resolves a tensor's checkpoint key and shape; the planner
    turns the ``ValueError`` it raises into a PlanError for the tensor.
    """

    def __init__(self) -> None:
        self._files: dict[Path, _Opened] = {}
        self._explicit: dict[tuple[Path, str], str] = {}

    def source(
        self,
        name: str,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        args: PretrainedArgs,
        base: Path,
    ) -> tuple[str, Source]:
        """Return the key that ``name`` reads and a function that reads it.

        Raises:
            ValueError: The file cannot be read, has no such key, contains a
                tensor of another shape or of a dtype that cannot be cast, or
                an explicit ``key`` is read by a second tensor.
        """
        opened = self._open(base / args.path)
        key = args.key if args.key is not None else _mapped(name, args.prefix)
        if args.key is not None:
            first = self._explicit.setdefault((opened.path, key), name)
            if first != name:
                raise ValueError(
                    f"the rule gives key {key!r}, which only one tensor can read, and "
                    f"it wins both {first!r} and {name!r}; narrow the rule's match or "
                    "map names with 'prefix'"
                )
        stored = opened.shapes.get(key)
        if stored is None:
            near = difflib.get_close_matches(key, opened.shapes, n=3)
            hint = f"; close keys: {', '.join(near)}" if near else ""
            raise ValueError(
                f"{opened.path} has no tensor {key!r} ({len(opened.shapes)} keys){hint}"
            )
        if stored != shape:
            raise ValueError(
                f"the checkpoint tensor {key!r} in {opened.path} has shape "
                f"{stored}, and the model's tensor has shape {shape}"
            )
        reader = opened.reader(key)
        problem = _cast_problem(reader, dtype)
        if problem is not None:
            raise ValueError(
                f"the checkpoint tensor {key!r} in {opened.path} {problem}"
            )
        return key, reader

    def _open(self, path: Path) -> _Opened:
        path = Path(os.path.abspath(path))
        opened = self._files.get(path)
        if opened is None:
            if path.is_dir():
                raise ValueError(
                    f"the checkpoint path {path} is a directory, not a file"
                )
            if not path.is_file():
                raise ValueError(f"the checkpoint file {path} does not exist")
            try:
                opened = _Opened(path)
            except ValueError:
                raise
            except Exception as error:
                raise ValueError(
                    f"cannot read the checkpoint {path}: {type(error).__name__}: "
                    f"{error}"
                ) from error
            self._files[path] = opened
        return opened


def _cast_problem(reader: Source, dtype: torch.dtype) -> str | None:
    """Return why the stored tensor cannot be copied into ``dtype``, or ``None``.

    Integers and booleans do not mix with floating-point values, and a value
    beyond the target's range would become Inf. The range test reads the
    tensor only when the target's range is narrower.
    """
    # NOTE: a safetensors tensor is read here and again when it is written.
    stored = reader()
    source = stored.dtype
    if source == dtype:
        return None
    if source.is_floating_point != dtype.is_floating_point or (
        source == torch.bool
    ) != (dtype == torch.bool):
        return f"is {_name(source)}, which does not cast to the model's {_name(dtype)}"
    if dtype.is_floating_point and torch.finfo(dtype).max < torch.finfo(source).max:
        largest = float(stored.abs().max()) if stored.numel() else 0.0
        if largest > torch.finfo(dtype).max:
            return (
                f"contains values up to {largest:.3g}, beyond the largest "
                f"{_name(dtype)} value ({torch.finfo(dtype).max:.3g})"
            )
    return None


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _mapped(name: str, prefix: Mapping[str, str]) -> str:
    """Replace the longest prefix of ``name`` that ``prefix`` maps."""
    for start in sorted(prefix, key=len, reverse=True):
        if name.startswith(start):
            return prefix[start] + name[len(start) :]
    return name


def _fill_pretrained(tensor: torch.Tensor, args: SchemeArgs, ctx: FillContext) -> None:
    if ctx.source is None:
        raise RuntimeError(
            "pretrained reads its tensor from the plan; apply it through "
            "initrules.apply"
        )
    tensor.copy_(ctx.source())


register_scheme(Scheme("pretrained", PretrainedArgs, _fill_pretrained, random=False))
