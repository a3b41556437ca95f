"""Build a model from a ``MODULE:FACTORY`` reference, for the command line.

``FACTORY`` may be a function or a class taking keyword arguments, or a
transformers model class, which is built from its config class with the
keyword arguments as config fields.
"""

from __future__ import annotations

import contextlib
import importlib
import json
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from initrules.errors import InitRulesError

__all__ = ["FactoryError", "build_model", "parse_model_args", "resolve_factory"]


class FactoryError(InitRulesError):
    """A ``MODULE:FACTORY`` reference or its arguments are invalid."""


def resolve_factory(reference: str) -> Callable[..., Any]:
    """Import ``MODULE:FACTORY`` (``FACTORY`` may be dotted) and return it."""
    module_name, colon, attribute_path = reference.partition(":")
    if not colon or not module_name or not attribute_path:
        raise FactoryError(
            f"invalid model reference {reference!r}: expected MODULE:FACTORY, as in "
            "'transformers:GPT2LMHeadModel' or 'my_models.cnn:build'"
        )
    if not all(part.isidentifier() for part in module_name.split(".")):
        raise FactoryError(
            f"invalid module name {module_name!r}: expected a dotted import path "
            "such as my_models.cnn, not a file path"
        )
    try:
        value: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise FactoryError(f"cannot import module {module_name!r}: {error}") from None
    except (Exception, SystemExit) as error:
        raise FactoryError(
            f"importing module {module_name!r} failed: {type(error).__name__}: {error}"
        ) from None
    for attribute in attribute_path.split("."):
        if not hasattr(value, attribute):
            raise FactoryError(
                f"module {module_name!r} has no attribute {attribute_path!r}"
            )
        value = getattr(value, attribute)
    if not callable(value):
        raise FactoryError(f"{reference!r} is not callable")
    return value  # type: ignore[no-any-return]


def parse_model_args(pairs: Sequence[str]) -> dict[str, Any]:
    """Parse ``KEY=VALUE`` pairs; values are JSON where they parse, else strings."""
    parsed: dict[str, Any] = {}
    for pair in pairs:
        key, equals, text = pair.partition("=")
        if not equals or not key.isidentifier():
            raise FactoryError(
                f"invalid model argument {pair!r}: expected KEY=VALUE, as in n_layer=12"
            )
        try:
            parsed[key] = json.loads(text)
        except json.JSONDecodeError:
            parsed[key] = text
    return parsed


def _is_transformers_model(factory: Callable[..., Any]) -> bool:
    return (
        isinstance(factory, type)
        and hasattr(factory, "config_class")
        and (getattr(factory, "config_class", None) is not None)
    )


@contextlib.contextmanager
def _on_device(device: str | None) -> Iterator[None]:
    if device is None:
        yield
        return
    with torch.device(device):
        yield


def _check_config_fields(config_class: Any, arguments: dict[str, Any]) -> None:
    """Reject keys the config class does not define; transformers keeps them."""
    known = set(config_class().to_dict()) | set(
        getattr(config_class, "attribute_map", {})
    )
    unknown = sorted(set(arguments) - known)
    if unknown:
        raise FactoryError(
            f"unknown field(s) of {config_class.__name__}: {', '.join(unknown)}; "
            "check the spelling against the config class"
        )


def build_model(
    reference: str,
    arguments: dict[str, Any],
    *,
    model_kwargs: dict[str, Any] | None = None,
    device: str | None = None,
) -> nn.Module:
    """Build the model named by ``reference``, optionally under a device context.

    Args:
        reference: ``MODULE:FACTORY``.
        arguments: Keyword arguments of the factory, or config fields of a
            transformers model class.
        model_kwargs: Keyword arguments of a transformers model class itself,
            besides its config (``add_pooling_layer=False`` for BertModel);
            for other factories they join ``arguments``.
        device: ``"meta"`` builds without allocating weights.

    Raises:
        FactoryError: The reference, the arguments or the result is invalid.
    """
    factory = resolve_factory(reference)
    extra = model_kwargs or {}
    try:
        with _on_device(device):
            if _is_transformers_model(factory):
                config_class = factory.config_class  # type: ignore[attr-defined]
                _check_config_fields(config_class, arguments)
                model = factory(config_class(**arguments), **extra)
            else:
                model = factory(**arguments, **extra)
    except FactoryError:
        raise
    except (Exception, SystemExit) as error:
        # Any failure of user code or of a model class's constructor is a
        # bad --model input, not a crash of initrules.
        raise FactoryError(
            f"cannot build {reference!r}: {type(error).__name__}: {error}"
        ) from None
    if not isinstance(model, nn.Module):
        raise FactoryError(
            f"{reference!r} returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model
