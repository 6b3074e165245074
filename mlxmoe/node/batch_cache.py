"""KV caches of several sessions decoded in one batched step (node/batch.py).

mlx-lm's BatchKVCache holds unquantized rows; its quantized counterpart is
missing (mlx_lm.server does not batch with --kv-bits), and a node keeps its
KV quantized. `BatchQuantizedKVCache` is BatchKVCache's layout — rows
left-padded to a common length, per-row `offset` and `left_padding` arrays
for RoPE and the mask — over QuantizedKVCache's packed (data, scales, biases)
triples, so attention takes mlx-lm's quantized path (the cache has `bits`).

`merge` / `extract` convert between one session's own caches (plain mlx-lm
KVCache or QuantizedKVCache, what sessions keep, export and import) and the
batch's; `filter` / `extend` drop and add rows as sessions finish and join.
"""

from __future__ import annotations

import mlx.core as mx
from mlx.utils import tree_map


def merge(caches: list) -> object:
    """The batch cache of one layer from each row's own cache of that layer."""
    from mlx_lm.models.cache import QuantizedKVCache

    if isinstance(caches[0], QuantizedKVCache):
        return BatchQuantizedKVCache.merge(caches)
    return caches[0].merge(caches)  # mlx-lm's own: BatchKVCache, BatchRotatingKVCache, ...


def quantizable(cache) -> bool:
    """mlx-lm quantizes only the plain KVCache: a sliding-window layer's
    RotatingKVCache (gpt_oss) raises NotImplementedError, so it stays unquantized."""
    from mlx_lm.models.cache import KVCache

    return type(cache) is KVCache


def quantize(caches: list, group_size: int, bits: int | None) -> list:
    """The caches with every quantizable layer quantized (in place, and returned)."""
    if bits:
        for i, c in enumerate(caches):
            if quantizable(c):
                caches[i] = c.to_quantized(group_size=group_size, bits=bits)
    return caches


def is_batched(cache) -> bool:
    return not isinstance(getattr(cache, "offset", 0), int)


class BatchQuantizedKVCache:
    step = 256

    def __init__(self, left_padding: list[int], group_size: int, bits: int):
        self.keys = self.values = None  # (packed, scales, biases), each [B, heads, length, ...]
        self.left_padding = mx.array(left_padding)
        self.offset = mx.array([-p for p in left_padding])
        self._idx = 0
        self.group_size, self.bits = group_size, bits

    # ------------------------------------------------------------ what attention uses
    def update_and_fetch(self, keys, values):
        prev, n = self._idx, keys.shape[2]
        if self.keys is None or prev + n > self.keys[0].shape[2]:
            self._grow(keys, values, prev, n)
        self.offset = self.offset + n
        self._idx += n
        for store, new in ((self.keys, keys), (self.values, values)):
            q = mx.quantize(new, group_size=self.group_size, bits=self.bits)
            for part, p in zip(store, q):
                part[..., prev:self._idx, :] = p
        return self.keys_and_values()

    def _grow(self, keys, values, prev: int, n: int) -> None:
        B, H = keys.shape[:2]
        length = -(-n // self.step) * self.step
        per_int = 32 // self.bits

        def empty(dim, dtype):
            return (mx.zeros((B, H, length, dim // per_int), mx.uint32),
                    mx.zeros((B, H, length, dim // self.group_size), dtype),
                    mx.zeros((B, H, length, dim // self.group_size), dtype))

        k_new, v_new = empty(keys.shape[-1], keys.dtype), empty(values.shape[-1], values.dtype)
        if self.keys is None:
            self.keys, self.values = k_new, v_new
            return
        self.keys, self.values = tree_map(lambda a, b: mx.concatenate([a[..., :prev, :], b], axis=2),
                                          (self.keys, self.values), (k_new, v_new))

    def keys_and_values(self):
        return tree_map(lambda a: a[..., :self._idx, :], (self.keys, self.values))

    def make_mask(self, N: int, return_array: bool = False, window_size=None, **kw):
        from mlx_lm.models.base import create_causal_mask

        return create_causal_mask(N, offset=self._idx, left_padding=self.left_padding, window_size=window_size)

    # ------------------------------------------------------------ rows
    @classmethod
    def merge(cls, caches: list) -> "BatchQuantizedKVCache":
        """Rows right-justified at the longest one (left padding for the others)."""
        lengths = [c.offset if c.keys is not None else 0 for c in caches]
        T = max(lengths)
        out = cls([T - n for n in lengths], caches[0].group_size, caches[0].bits)
        full = [c for c in caches if c.keys is not None]
        if not full:
            return out

        def stacked(get):
            parts = []
            for c, n in zip(caches, lengths):
                like = get(full[0])
                if n == 0:
                    parts.append(tuple(mx.zeros((1, a.shape[1], T, a.shape[3]), a.dtype) for a in like))
                    continue
                parts.append(tuple(mx.pad(a[..., :n, :], [(0, 0), (0, 0), (T - n, 0), (0, 0)]) for a in get(c)))
            return tuple(mx.concatenate([p[i] for p in parts]) for i in range(3))

        out.keys, out.values = stacked(lambda c: c.keys), stacked(lambda c: c.values)
        out.offset = out.offset + T
        out._idx = T
        return out

    def extract(self, idx: int):
        """Row `idx` as a session's own QuantizedKVCache (its padding cut off)."""
        from mlx_lm.models.cache import QuantizedKVCache

        c = QuantizedKVCache(group_size=self.group_size, bits=self.bits)
        pad = self.left_padding.tolist()[idx]
        c.keys, c.values = tree_map(lambda a: mx.contiguous(a[idx:idx + 1, :, pad:self._idx]), (self.keys, self.values))
        c.offset = self._idx - pad
        return c

    def filter(self, keep: list[int]) -> None:
        idx = mx.array(keep)
        if self.keys is not None:
            self.keys, self.values = tree_map(lambda a: a[idx], (self.keys, self.values))
        self.offset, self.left_padding = self.offset[idx], self.left_padding[idx]
        shift = min(self.left_padding.tolist())  # padding every remaining row has: drop it
        if shift > 0:
            if self.keys is not None:
                self.keys, self.values = tree_map(lambda a: a[..., shift:, :], (self.keys, self.values))
            self._idx -= shift
            self.left_padding = self.left_padding - shift

    def extend(self, other: "BatchQuantizedKVCache") -> None:
        """Append other's rows, both right-justified at the longer one."""
        idx = max(self._idx, other._idx)
        full = [c for c in (self, other) if c.keys is not None]
        if full:
            size = max(c.keys[0].shape[2] for c in full)
            like = (full[0].keys, full[0].values)

            def padded(c):
                if c.keys is None:  # rows with no KV yet: zeros (all padding)
                    B = c.offset.shape[0]
                    return tree_map(lambda a: mx.zeros((B, a.shape[1], size, a.shape[3]), a.dtype), like)
                return tree_map(lambda a: _pad_time(a, idx - c._idx, size), (c.keys, c.values))

            self.keys, self.values = tree_map(lambda a, b: mx.concatenate([a, b]), padded(self), padded(other))
        self.offset = mx.concatenate([self.offset, other.offset])
        self.left_padding = mx.concatenate([self.left_padding + (idx - self._idx), other.left_padding + (idx - other._idx)])
        self._idx = idx

    # ------------------------------------------------------------ the cache API mlx-lm reads
    @property
    def state(self):
        return self.keys, self.values, self.offset, self.left_padding

    def size(self) -> int:
        return self._idx

    def empty(self) -> bool:
        return self.keys is None

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(self._idx, n)
        self._idx -= n
        self.offset = self.offset - n
        return n

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return sum(a.nbytes for a in self.keys + self.values)


def _pad_time(a: mx.array, left: int, size: int) -> mx.array:
    """a [B, H, T, D] with `left` zero steps in front, cut or zero-filled to `size` steps."""
    if left:
        a = mx.pad(a, [(0, 0), (0, 0), (left, 0), (0, 0)])
    if a.shape[2] > size:
        return a[..., :size, :]
    if a.shape[2] < size:
        a = mx.pad(a, [(0, 0), (0, 0), (0, size - a.shape[2]), (0, 0)])
    return a
