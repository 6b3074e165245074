"""A session's KV caches <-> plain msgpack-friendly dicts, for moving a
session between nodes (export_session / import_session).

Through mlx-lm's own cache state API, so every cache class it has (plain,
quantized, rotating, ...) moves without this module knowing its fields:
`cache.state` (a tree of arrays and scalars: since mlx-lm 0.32 the whole
state, numbers included) and the class's `from_state(state)`. This is the one
place that knows that API; pyproject pins the mlx-lm range it holds for.

One cache = {"type": class name, "state": tree}; a tree node is {"a": tensor}
(mlxmoe.wire's codec), {"l": [nodes]} or {"v": scalar}.
"""

from __future__ import annotations

import mlx.core as mx

from mlxmoe import wire
from mlxmoe.errors import MlxMoeError


def export_caches(caches: list | None) -> list[dict]:
    return [{"type": type(c).__name__, "state": _tree(list(c.state))} for c in caches or []]


def import_caches(states: list[dict]) -> list | None:
    return [_restore(d) for d in states] or None


def _restore(d: dict):
    from mlx_lm.models import cache as cache_mod

    cls = getattr(cache_mod, d["type"], None)
    if not isinstance(cls, type) or not hasattr(cls, "from_state"):
        raise MlxMoeError(f"session import: unknown cache type {d['type']!r}")
    return cls.from_state(_untree(d["state"]))


def _tree(x):
    if isinstance(x, mx.array):
        return {"a": wire.encode_tensor(x)}
    if isinstance(x, (list, tuple)):
        return {"l": [_tree(v) for v in x]}
    return {"v": x}


def _untree(x):
    if "a" in x:
        return wire.decode_tensor(x["a"])
    if "l" in x:
        return [_untree(v) for v in x["l"]]
    return x["v"]
