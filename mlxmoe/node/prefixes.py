"""Prompt prefixes shared across sessions (docs/ARCHITECTURE.md, Prefix cache).

Agents and chat apps send the same long prefix (a system prompt, tool definitions, a document) at the start of
every new chat. A session whose own cache covers less of its prompt takes the KV of the longest prefix the prompt
shares with an idle session of this node, or with a closed session's cache kept here: copied, trimmed to the
shared tokens, and only the rest is prefilled. Causal attention makes a prefix's KV independent of what follows
it, so the answer is the one a fresh prefill gives. Closed sessions' caches are kept in mlx-lm's LRUPromptCache
(a token trie, least recently used out first), counted in the node's KV budget and dropped before any session's.
Only KV computed with this node's own experts is shared: a session that borrowed a peer's experts (onehop,
split, group) holds other values."""

from __future__ import annotations

import copy
from dataclasses import dataclass

from mlx_lm.models.cache import LRUPromptCache, can_trim_prompt_cache, trim_prompt_cache

MIN_SHARED = 64  # tokens: a shorter shared prefix is not worth copying a cache for
MAX_KEPT = 32  # closed sessions' caches kept at most (the KV budget bounds them too)
_MODEL = "node"  # LRUPromptCache keys its trie by model; a node serves one


@dataclass
class Shared:
    """A copy of a cache holding the KV of `prompt[:n]`."""
    cache: list
    n: int


def shared_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Prefixes:
    def __init__(self, max_kept: int = MAX_KEPT):
        self.kept = LRUPromptCache(max_size=max_kept)
        self.hits = 0  # sessions that started from a shared prefix
        self.tokens = 0  # prompt tokens they did not prefill

    @property
    def nbytes(self) -> int:
        return self.kept.nbytes

    def keep(self, tokens: list[int], cache: list) -> None:
        """A closed session's cache, kept for later sessions (the caller no longer uses it)."""
        if len(tokens) >= MIN_SHARED and cache and can_trim_prompt_cache(cache):
            self.kept.insert_cache(_MODEL, list(tokens), cache)

    def drop_oldest(self) -> bool:
        """Free the least recently used kept cache; False when none is left."""
        if not len(self.kept):
            return False
        self.kept.trim_to(n_sequences=len(self.kept) - 1)
        return True

    def find(self, prompt: list[int], have: int, donors) -> Shared | None:
        """The longest prefix of `prompt` (leaving its last token to feed) that an idle session (`donors`:
        (tokens, cache) pairs) or a kept cache holds, if it beats `have` (what the session's own cache covers)
        by MIN_SHARED tokens: a copy of that cache, trimmed to it."""
        limit = len(prompt) - 1
        n, tokens, cache = max(((min(shared_length(t, prompt), limit), t, c) for t, c in donors
                                if can_trim_prompt_cache(c)), key=lambda x: x[0], default=(0, None, None))
        kept, rest = self.kept.fetch_nearest_cache(_MODEL, prompt)  # a lazy copy (MLX copies on write)
        if kept is not None and len(prompt) - len(rest) > n:
            n, cache = min(len(prompt) - len(rest), limit), kept
            trim_prompt_cache(cache, len(prompt) - len(rest) - n)  # an exact match leaves one token to feed
        elif cache is not None:
            cache = copy.deepcopy(cache)
            trim_prompt_cache(cache, len(tokens) - n)
        if n < have + MIN_SHARED:
            return None
        self.hits, self.tokens = self.hits + 1, self.tokens + n
        return Shared(cache, n)
