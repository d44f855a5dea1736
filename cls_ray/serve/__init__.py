"""Ray Serve deployment of a model package: HTTP ingress, dynamically batched model replicas, upload page.

Entry points live in :mod:`cls_ray.serve.app` (``start_serving``, ``stop_serving``, ``serve_model``,
``write_serve_config``, the Serve builder ``build_app`` and the module-level ``app``).
"""

from __future__ import annotations

from typing import Any

__all__ = ["build_app", "serve_model", "start_serving", "stop_serving", "write_serve_config"]


def __getattr__(name: str) -> Any:
    # Lazy, so that importing a submodule (schemas, inputs) does not import Ray Serve.
    if name in __all__:
        from cls_ray.serve import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
