"""Sessions and their KV caches under a per-node memory budget.

Each session keeps its own cache and the tokens it covers; a later turn that
extends those tokens reuses the cache (only the new suffix is prefilled). When
the KV budget is reached, idle sessions are evicted least recently used first:
their cache is dropped, their transcript kept, so a later turn re-prefills and
nothing is lost."""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

from mlxmoe.errors import AdmissionError, ContextOverflow


@dataclass
class Session:
    id: str
    tokens: list = field(default_factory=list)  # tokens whose KV is in `cache`
    cache: list | None = None  # None: never built, or evicted
    last_used: float = field(default_factory=time.time)
    busy: bool = False
    turns: int = 0
    local: bool = True  # its KV was computed with this node's experts only (no routing mode borrowed a peer's)

    @property
    def kv_bytes(self) -> int:
        return sum(c.nbytes for c in self.cache if not c.empty()) if self.cache else 0


class SessionStore:
    step = 256  # mlx-lm's KV caches grow in blocks of this many tokens

    def __init__(self, budget_bytes: int, bytes_per_token: float):
        self.budget, self.per_token = int(budget_bytes), bytes_per_token
        self.sessions: OrderedDict[str, Session] = OrderedDict()
        self.evictions = 0
        self.held = lambda: 0  # KV held outside sessions' own caches (the node's decoding batch, kept prefixes)
        self.drop_spare = lambda: False  # frees some KV nothing needs (a kept prefix); False when none is left

    def get(self, sid: str) -> Session:
        s = self.sessions.pop(sid, None) or Session(sid)
        self.sessions[sid] = s  # most recently used last
        s.last_used = time.time()
        return s

    def used(self) -> int:
        return sum(s.kv_bytes for s in self.sessions.values()) + self.held()

    def make_room(self, more: int, keep: Session | None = None) -> bool:
        """Drop kept prefixes, then evict idle sessions' caches (not `keep`'s), LRU first, until `more` bytes
        fit; whether they do."""
        while self.used() + more > self.budget and self.drop_spare():
            pass
        for s in list(self.sessions.values()):
            if self.used() + more <= self.budget:
                return True
            if s is not keep and not s.busy and s.cache is not None:
                s.cache, s.tokens = None, []
                self.evictions += 1
        return self.used() + more <= self.budget

    def admit(self, session: Session, new_tokens: int):
        """Make room for `new_tokens` more KV in `session`, evicting idle
        sessions LRU-first; refuse if that cannot be done."""
        total = len(session.tokens) + new_tokens
        want = -(-total // self.step) * self.step * self.per_token  # as allocated
        need = max(0, int(want) - session.kv_bytes)
        if want > self.budget:
            raise ContextOverflow(
                f"session {session.id}: needs ~{want / 2**20:.1f} MiB of KV cache for "
                f"{total} tokens, but this node's KV budget is {self.budget / 2**20:.1f} MiB "
                "(raise --kv-budget, lower --kv-bits, or send a shorter prompt / max_tokens)")
        if not self.make_room(need, keep=session):
            raise AdmissionError(f"KV budget full ({self.used() / 2**20:.1f} of {self.budget / 2**20:.1f} MiB) "
                                 "with sessions that are generating; retry shortly")

    def close(self, sid: str) -> bool:
        return self.sessions.pop(sid, None) is not None
