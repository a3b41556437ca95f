"""Statistical comparison of a model's initialized tensors against a reference model.

Two models of the same architecture, initialized from different random draws, cannot be
compared element by element. `compare_to_reference` instead checks each random tensor's
mean and standard deviation, and compares constant tensors, zeroed rows, integer tensors
and weight tying exactly.
"""

import math

import torch
from torch import nn

DEFAULT_SIGMAS = 5.0
# Absolute slack added to every statistical tolerance, to absorb float32 rounding.
ABSOLUTE_EPSILON = 1e-7


def compare_to_reference(
    reference_model: nn.Module,
    model: nn.Module,
    *,
    sigmas: float = DEFAULT_SIGMAS,
) -> list[str]:
    """Compare each parameter and buffer of `model` with its namesake in the reference.

    Returns one readable description per mismatch, or an empty list when they agree.
    The checks are:

    - Names, shapes, dtypes and weight tying must be identical.
    - Non-floating-point tensors, and floating-point tensors whose elements are all
      equal in the reference, must be exactly equal.
    - Rows (slices along dim 0) that are all zero in the reference, such as an
      embedding's padding row, must be all zero in `model`, and no other row may be.
    - The remaining elements must be finite, and their mean and standard deviation
      must agree with the reference within `sigmas` standard errors of the
      difference of two independent draws.

    For n elements with reference standard deviation s, the standard error of one
    draw's standard deviation is s / sqrt(2n) and that of its mean is s / sqrt(n).
    The difference of two draws has sqrt(2) times those, so the tolerances are
    sigmas * s / sqrt(n) for the standard deviation and sigmas * s * sqrt(2 / n) for
    the mean.

    NOTE: the standard error of the standard deviation assumes a roughly normal
    distribution. It is too loose for uniform draws and too tight for heavy-tailed
    ones such as `sparse`.
    """
    mismatches = _compare_tying(reference_model, model)

    reference_tensors = _named_tensors(reference_model)
    tensors = _named_tensors(model)
    for name in reference_tensors.keys() - tensors.keys():
        mismatches.append(f"{name}: missing from the model")
    for name in tensors.keys() - reference_tensors.keys():
        mismatches.append(f"{name}: not present in the reference model")

    for name, reference in reference_tensors.items():
        if name in tensors:
            mismatches.extend(_compare_tensor(name, reference, tensors[name], sigmas))
    return mismatches


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Map each parameter and buffer name, tied names included, to its tensor."""
    named = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        named[name] = param.detach()
    for name, buffer in model.named_buffers(remove_duplicate=False):
        named[name] = buffer.detach()
    return named


def _tied_groups(model: nn.Module) -> set[frozenset[str]]:
    """Group the parameter names that refer to one shared Parameter object."""
    names_by_id: dict[int, set[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_by_id.setdefault(id(param), set()).add(name)
    return {frozenset(names) for names in names_by_id.values() if len(names) > 1}


def _compare_tying(reference_model: nn.Module, model: nn.Module) -> list[str]:
    reference_groups = _tied_groups(reference_model)
    groups = _tied_groups(model)
    mismatches = []
    for group in reference_groups - groups:
        mismatches.append(f"{sorted(group)}: tied in the reference, not in the model")
    for group in groups - reference_groups:
        mismatches.append(f"{sorted(group)}: tied in the model, not in the reference")
    return mismatches


def _compare_tensor(
    name: str,
    reference: torch.Tensor,
    tensor: torch.Tensor,
    sigmas: float,
) -> list[str]:
    if tensor.shape != reference.shape:
        shapes = f"{tuple(tensor.shape)}, reference {tuple(reference.shape)}"
        return [f"{name}: shape {shapes}"]
    if tensor.dtype != reference.dtype:
        return [f"{name}: dtype {tensor.dtype}, reference {reference.dtype}"]

    if not reference.is_floating_point() or _is_constant(reference):
        if torch.equal(tensor, reference):
            return []
        expected = _describe_values(reference)
        return [f"{name}: expected exactly {expected}, got {_describe_values(tensor)}"]

    reference_zero_rows = _zero_rows(reference)
    zero_rows = _zero_rows(tensor)
    if zero_rows != reference_zero_rows:
        rows = f"{sorted(zero_rows)}, reference {sorted(reference_zero_rows)}"
        return [f"{name}: all-zero rows {rows}"]

    keep = torch.ones(reference.shape[0], dtype=torch.bool)
    keep[sorted(reference_zero_rows)] = False
    reference_values = reference[keep].double().flatten()
    values = tensor[keep].double().flatten()
    if not torch.isfinite(values).all():
        count = int((~torch.isfinite(values)).sum())
        return [f"{name}: {count} of {values.numel()} elements are not finite"]

    return _compare_moments(name, reference_values, values, sigmas)


def _compare_moments(
    name: str,
    reference_values: torch.Tensor,
    values: torch.Tensor,
    sigmas: float,
) -> list[str]:
    count = values.numel()
    reference_std = reference_values.std().item()
    reference_mean = reference_values.mean().item()
    std = values.std().item()
    mean = values.mean().item()

    std_tolerance = sigmas * reference_std / math.sqrt(count) + ABSOLUTE_EPSILON
    mean_tolerance = sigmas * reference_std * math.sqrt(2.0 / count) + ABSOLUTE_EPSILON

    mismatches = []
    if abs(std - reference_std) > std_tolerance:
        mismatches.append(
            f"{name}: std {std:.6g}, reference {reference_std:.6g} "
            f"(difference {std - reference_std:+.3g}, "
            f"tolerance {std_tolerance:.3g}, n={count})"
        )
    if abs(mean - reference_mean) > mean_tolerance:
        mismatches.append(
            f"{name}: mean {mean:.6g}, reference {reference_mean:.6g} "
            f"(difference {mean - reference_mean:+.3g}, "
            f"tolerance {mean_tolerance:.3g}, n={count})"
        )
    return mismatches


def _is_constant(tensor: torch.Tensor) -> bool:
    if tensor.numel() == 0:
        return True
    return bool((tensor == tensor.flatten()[0]).all())


def _zero_rows(tensor: torch.Tensor) -> set[int]:
    """Return the indices along dim 0 whose slices are all zero.

    Only tensors with at least 2 dims and slices of at least 2 elements have rows,
    because a single zero element is not a zeroed row.
    """
    if tensor.ndim < 2 or tensor[0].numel() < 2:
        return set()
    is_zero = (tensor == 0).flatten(start_dim=1).all(dim=1)
    return set(torch.nonzero(is_zero).flatten().tolist())


def _describe_values(tensor: torch.Tensor) -> str:
    if tensor.numel() == 0:
        return "no elements"
    if _is_constant(tensor):
        return f"all {tensor.flatten()[0].item()}"
    if tensor.is_floating_point():
        low = tensor.min().item()
        high = tensor.max().item()
        return f"values with min {low:.6g}, max {high:.6g}"
    return f"values {tensor.flatten()[:8].tolist()}"
