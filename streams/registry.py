"""Model registries told about promotions: the hook a canary calls when it reaches 100%.

``ABSTREAM_MODEL_REGISTRY`` chooses it:

- empty (the default): no registry is told;
- ``mlflow``: :class:`MlflowRegistry` points the registered model's ``champion`` alias at the
  promoted variant's ``model_version`` (MLflow >= 2.3; ``MLFLOW_TRACKING_URI`` says where);
- ``package.module:factory``: any callable taking the settings and returning an object with
  ``promote(experiment_id, variant, model_name, model_version)``.

The hook runs outside the stream (in a thread); a failure is logged and counted in
``abstream_registry_errors_total`` and never stops the worker: the promote kill-switch
record on ``<prefix>killswitch`` is the source of truth either way.
"""
from __future__ import annotations

import importlib
from typing import Any, Protocol

from streams.settings import Settings, SettingsError


class ModelRegistry(Protocol):
    def promote(self, experiment_id: str, variant: str, model_name: str, model_version: str) -> None: ...


class MlflowRegistry:
    """Sets the ``champion`` alias of the variant's registered model to its version."""

    def __init__(self, settings: Settings):
        try:
            from mlflow import MlflowClient
        except ImportError:
            raise SettingsError("ABSTREAM_MODEL_REGISTRY=mlflow needs the mlflow package: pip install mlflow") from None
        self._client = MlflowClient()

    def promote(self, experiment_id: str, variant: str, model_name: str, model_version: str) -> None:
        self._client.set_registered_model_alias(model_name, "champion", model_version)


def model_registry(settings: Settings) -> ModelRegistry | None:
    """The registry the settings name, or None."""
    name = settings.model_registry
    if not name:
        return None
    if name == "mlflow":
        return MlflowRegistry(settings)
    module, _, factory = name.partition(":")
    try:
        make: Any = getattr(importlib.import_module(module), factory)
    except (ImportError, AttributeError, ValueError):
        raise SettingsError(f"ABSTREAM_MODEL_REGISTRY={name!r} names no importable factory "
                            "(use mlflow or package.module:factory)") from None
    return make(settings)
