"""KV state adapter (node/kvstate.py): every mlx-lm cache class moves through
plain msgpack bytes and comes back bit for bit; unknown types are named."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import cache as cache_mod

from mlxmoe import wire
from mlxmoe.errors import MlxMoeError
from mlxmoe.node.kvstate import export_caches, import_caches


def _filled(c, n=5):
    k = mx.random.normal((1, 2, n, 64), key=mx.random.key(n)).astype(mx.bfloat16)
    c.update_and_fetch(k, k * 2)
    return c


def _moved(caches):
    return import_caches(wire.unpack(wire.pack(export_caches(caches))))


@pytest.mark.parametrize("make", [cache_mod.KVCache, lambda: cache_mod.QuantizedKVCache(group_size=32, bits=8),
                                  lambda: cache_mod.RotatingKVCache(max_size=16)])
def test_caches_come_back_bit_for_bit(make):
    a = [_filled(make()), _filled(make(), 3)]
    b = _moved(a)
    for x, y in zip(a, b):
        assert type(y) is type(x) and y.offset == x.offset
        fx, fy = tree_flatten(list(x.state)), tree_flatten(list(y.state))
        assert [k for k, _ in fx] == [k for k, _ in fy]
        for (_, u), (_, v) in zip(fx, fy):
            if isinstance(u, mx.array):
                assert u.dtype == v.dtype and mx.array_equal(u, v).item()
            else:
                assert u == v


def test_no_cache_is_none_and_unknown_types_are_named():
    assert export_caches(None) == [] and import_caches([]) is None
    for name in ("NoSuchCache", "mx", "create_attention_mask"):
        with pytest.raises(MlxMoeError, match=repr(name)):
            import_caches([{"type": name, "state": {"l": []}}])
