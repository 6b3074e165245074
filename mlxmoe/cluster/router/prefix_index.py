"""Which node holds which prompt prefixes, as the router last left them (pure; docs/ARCHITECTURE.md, Prefix
cache). A node keeps its chats' KV for later chats that start the same way (node/prefixes.py); the router
remembers, per node, hashes of the token blocks of each context it left there, and a new chat goes to the node
that holds most of its prompt among the nodes that serve it equally well (ranking.rank_candidates). A guess,
never a promise: the node may have dropped the prefix since, and then it prefills as any node would."""

from __future__ import annotations

import hashlib
from collections import OrderedDict

BLOCK = 64  # tokens per hashed block (the node shares prefixes of at least node.prefixes.MIN_SHARED)
PER_NODE = 8192  # block hashes remembered per node, least recently used out first


def block_hashes(tokens: list[int], block: int = BLOCK) -> list[bytes]:
    """Chained hashes of tokens[:block], tokens[:2 * block], ...: equal hashes, equal prefixes."""
    out, h = [], b""
    for i in range(block, len(tokens) + 1, block):
        h = hashlib.blake2b(h + str(tokens[i - block:i]).encode(), digest_size=12).digest()
        out.append(h)
    return out


class PrefixIndex:
    def __init__(self, block: int = BLOCK, per_node: int = PER_NODE):
        self.block, self.per_node = block, per_node
        self.nodes: dict[str, OrderedDict[bytes, None]] = {}

    def record(self, node: str, tokens: list[int]) -> None:
        """`node` holds the KV of `tokens` now (a turn there ended with this context)."""
        seen = self.nodes.setdefault(node, OrderedDict())
        for h in block_hashes(tokens, self.block):
            seen[h] = None
            seen.move_to_end(h)
        while len(seen) > self.per_node:
            seen.popitem(last=False)

    def shared(self, tokens: list[int]) -> dict[str, int]:
        """node -> how many leading tokens of `tokens` it holds (whole blocks; only nodes holding some)."""
        hashes = block_hashes(tokens[:-1], self.block)  # a node always computes the prompt's last token
        out = {}
        for node, seen in self.nodes.items():
            k = next((i for i in range(len(hashes), 0, -1) if hashes[i - 1] in seen), 0)
            if k:
                out[node] = k * self.block
        return out

    def forget(self, node: str) -> None:
        self.nodes.pop(node, None)
