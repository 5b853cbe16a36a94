"""Backends by name. Each is imported only when asked for, so `validate` stays light."""

from __future__ import annotations

import importlib

from automation.backends.base import Backend
from automation.errors import ConfigError

BACKENDS = {
    "local": "automation.backends.local.backend:LocalBackend",  # the default, listed first
    "azure": "automation.backends.azure.backend:AzureBackend",
}


def get_backend(name: str) -> Backend:
    target = BACKENDS.get(name)
    if target is None:
        raise ConfigError(f"unknown backend {name!r}; valid backends: {', '.join(BACKENDS)}")
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)()
