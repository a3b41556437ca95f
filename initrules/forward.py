"""Run a model's forward pass without leaving a trace on the model.

The probe and the data-dependent schemes run forward passes on a model that
the user owns. :func:`preserved` puts every module in eval mode under
``torch.no_grad()`` and afterwards restores each module's own training flag,
every buffer's values and the global random state, even when the forward
raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["call_model", "first_floating_tensor", "preserved"]


@contextlib.contextmanager
def preserved(model: nn.Module) -> Iterator[None]:
    """Run the body in eval mode and no_grad, then restore the model's state.

    Restored afterwards, even when the body raises: the ``training`` flag of
    every module, every buffer (the same tensor object, with its earlier
    values), and the global CPU random state, plus CUDA's when CUDA was
    initialized before the call.
    """
    modules = list(model.modules())
    training = [module.training for module in modules]
    buffer_slots, buffer_values = _snapshot_buffers(modules)
    cpu_rng_state = torch.get_rng_state()
    # torch.cuda.is_initialized has no annotations in torch 2.13.
    cuda_initialized: bool = torch.cuda.is_initialized()  # type: ignore[no-untyped-call]
    cuda_rng_states = torch.cuda.get_rng_state_all() if cuda_initialized else None
    try:
        # The flag is set on each module directly instead of calling
        # model.eval(), because a module may override train() to keep some
        # children in training mode or to run other code.
        for module in modules:
            module.training = False
        with torch.no_grad():
            yield
    finally:
        for module, mode in zip(modules, training, strict=True):
            module.training = mode
        _restore_buffers(buffer_slots, buffer_values)
        torch.set_rng_state(cpu_rng_state)
        if cuda_rng_states is not None:
            torch.cuda.set_rng_state_all(cuda_rng_states)


_BufferSlot = tuple[nn.Module, str, torch.Tensor]


def _snapshot_buffers(
    modules: list[nn.Module],
) -> tuple[list[_BufferSlot], dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """Record where each buffer sits and copy the values of each distinct one."""
    slots: list[_BufferSlot] = []
    values: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for module in modules:
        for name, buffer in module._buffers.items():
            if buffer is None:
                continue
            slots.append((module, name, buffer))
            if id(buffer) not in values:
                values[id(buffer)] = (buffer, buffer.detach().clone())
    return slots, values


def _restore_buffers(
    slots: list[_BufferSlot], values: dict[int, tuple[torch.Tensor, torch.Tensor]]
) -> None:
    # A forward may rebind a buffer (``self.count = self.count + 1``) or change
    # it in place (``self.count += 1``). The first case is undone by putting
    # the original object back, the second by copying the saved values.
    # NOTE: buffers that the forward registers anew are left in place.
    for module, name, buffer in slots:
        if module._buffers.get(name) is not buffer:
            module._buffers[name] = buffer
    with torch.no_grad():
        for buffer, saved in values.values():
            buffer.copy_(saved)


def first_floating_tensor(output: Any) -> torch.Tensor | None:
    """Return the output itself or the first floating-point tensor among its items.

    Returns ``None`` when there is none.
    """
    # transformers' ModelOutput subclasses OrderedDict, so the Mapping branch
    # covers it. Its values() leave out fields that are None.
    if isinstance(output, torch.Tensor):
        items: list[Any] = [output]
    elif isinstance(output, Mapping):
        items = list(output.values())
    elif isinstance(output, (tuple, list)):
        items = list(output)
    else:
        return None
    for item in items:
        if isinstance(item, torch.Tensor) and item.is_floating_point():
            return item
    return None


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Call ``model`` on example inputs given in one value.

    A tuple is spread as positional arguments, a dict as keyword arguments,
    and anything else (a tensor) is the single positional argument.
    """
    if isinstance(inputs, tuple):
        return model(*inputs)
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(inputs)
