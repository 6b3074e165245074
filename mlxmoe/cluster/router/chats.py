"""The router's chats: one per conversation (a session, as the API and the
nodes call it: its id names the node's session too), found again by the
client's session id (hint) or by the hash of its messages before the last
user turn, and forgotten after `session_ttl` idle seconds (chats the client
named no session for, i.e. one-shot API requests, after their shorter `ttl`).
A node's own sessions (their KV caches) are node/sessions.py's."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

from mlxmoe.cluster.sessionview import session_ref, tok_s
from mlxmoe.modes import DEFAULT_MODE, MIGRATING, node_routing


@dataclass
class Chat:
    """One conversation as the router places it: its groups' scores, the node it is pinned to, its mode,
    its migrations and the turn streaming now."""

    id: str  # the session id the client sees; its node's session has the same id
    scores: dict[int, float]
    ranked: list[int]
    margin: float
    tie_key: int = 0  # of its first prompt: orders tied groups for deterministic requests (ranking.py)
    peer: str | None = None  # pinned node (Peer.name)
    group: int | None = None
    turns: int = 0
    tokens: int = 0
    created: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    ephemeral: bool = False
    keys: list[str] = field(default_factory=list)  # hints and prefix hashes that lead here
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    mode: str = DEFAULT_MODE
    prefer: str = "quality"  # where it goes: the node that serves it best, or ("speed") the least loaded
    expert_group: int | None = None  # soft migration: the group computing every MoE layer's experts
    context: list[int] = field(default_factory=list)  # last turn's prompt + reply
    streak: tuple = (None, 0)  # (challenger group, consecutive checks it won)
    last_check: dict | None = None
    migrations: list[dict] = field(default_factory=list)
    without: list[int] = field(default_factory=list)  # onehop/split: groups no live node serves (placement)
    race: dict | None = None
    remote: dict = field(default_factory=dict)  # node name -> {"routing", "remote_calls", "remote_bytes", "remote_s"}
    meter: list = field(default_factory=list)  # the quality meter of its last turns (router/quality_watch.py)
    meter_seen: int = 0  # turns the pinned node has metered, as last harvested
    meter_replaced: bool = False  # the meter re-placed it once already
    shared: dict[str, int] = field(default_factory=dict)  # node -> tokens of its first prompt it holds (prefix_index)
    owner: str = ""  # the client that made it: its API key's hash ("" without API keys)
    ttl: float | None = None  # idle seconds before it is forgotten (None: the router's session_ttl)
    # the turn streaming now (Turn updates these per frame; /status shows them live)
    streaming: bool = False
    turn_tokens: int = 0  # tokens generated so far in this turn
    turn_prompt: int = 0
    turn_started: float | None = None
    turn_first: float | None = None  # when its first token arrived

    @property
    def ref(self) -> str:
        """A short hash of the id, to show where the id itself must not be (it does not resume the session)."""
        return session_ref(self.id)

    @property
    def routing(self) -> str:
        return node_routing(self.mode, self.expert_group, self.group)

    @property
    def placed(self) -> bool:
        """Has it ever run a turn on a node (else a failed first turn leaves nothing behind)."""
        return self.turns > 0 or self.peer is not None

    def set_mode(self, mode: str) -> None:
        self.mode = mode
        if mode not in MIGRATING:
            self.expert_group, self.streak = None, (None, 0)  # decode local again

    def start_turn(self, n_prompt: int) -> None:
        self.streaming, self.turn_tokens, self.turn_prompt = True, 0, n_prompt
        self.turn_started, self.turn_first = time.time(), None

    def got_token(self) -> None:
        self.turn_tokens += 1
        if self.turn_first is None:
            self.turn_first = time.time()
        self.last_used = time.time()

    def end_turn(self, context: list[int]) -> None:
        """Bookkeeping after a turn (completed, failed or cancelled); releases the lock."""
        self.streaming = False
        self.turns += 1
        self.tokens = len(context)
        self.context = list(context)
        self.last_used = time.time()
        if self.lock.locked():
            self.lock.release()

    def live(self, now: float) -> dict:
        """The turn streaming now: generating, its tokens so far and their rate."""
        return {"generating": self.streaming, "turn_tokens": self.turn_tokens if self.streaming else 0,
                "tok_s": tok_s(self.turn_tokens, self.turn_first, now) if self.streaming else None}

    def status(self, now: float | None = None, active_s: float = 60.0) -> dict:
        now = time.time() if now is None else now
        turns = self.turns + (1 if self.streaming else 0)  # the streaming turn counts from its start
        tokens = self.turn_prompt + self.turn_tokens if self.streaming else self.tokens
        return {**self.live(now), "active": self.streaming or now - self.last_used <= active_s,
                "api": self.ttl is not None, "id": self.id, "ref": self.ref, "node": self.peer, "group": self.group,
                "scores": {str(g): s for g, s in self.scores.items()}, "margin": self.margin,
                "mode": self.mode, "routing": self.routing, "prefer": self.prefer,
                "expert_group": self.group if self.expert_group is None else self.expert_group,
                "migrations": list(self.migrations), "last_check": self.last_check, "race": self.race,
                "without_groups": list(self.without),
                "remote_calls": sum(int(v.get("remote_calls") or 0) for v in self.remote.values()),
                "remote_bytes": sum(int(v.get("remote_bytes") or 0) for v in self.remote.values()),
                "remote_s": round(sum(float(v.get("remote_s") or 0) for v in self.remote.values()), 4),
                "quality_meter": self.meter[-1] if self.meter else None,
                "turns": turns, "tokens": tokens,
                "created": self.created, "last_used": self.last_used}


def _text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def prefix_key(messages: list[dict]) -> str:
    canon = [[m.get("role"), _text(m.get("content"))] for m in messages]
    return "p:" + hashlib.sha256(json.dumps(canon, ensure_ascii=False).encode()).hexdigest()


def before_last_user(messages: list[dict]) -> list[dict] | None:
    """Messages before the last user turn, or None if there is no earlier
    assistant turn (a first turn never matches an existing session)."""
    idx = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
    if idx is None:
        return None
    head = messages[:idx]
    return head if any(m.get("role") == "assistant" for m in head) else None


def _scoped(kind: str, owner: str, key: str) -> str:
    """An index key of one owner (clients with different API keys never share hints or prefixes)."""
    return f"{kind}{owner}:{key}" if owner else kind + key


class ChatIndex:
    """Chats by id, and the keys (hints "h:...", prefix hashes "p:...") that lead to them."""

    def __init__(self):
        self.by_id: dict[str, Chat] = {}
        self.by_key: dict[str, str] = {}  # hint / prefix hash -> session id

    def __len__(self) -> int:
        return len(self.by_id)

    def __iter__(self):
        return iter(list(self.by_id.values()))

    def get(self, sid: str) -> Chat | None:
        return self.by_id.get(sid)

    def find(self, hint: str | None, messages: list[dict] | None, owner: str = "") -> Chat | None:
        """The chat of `owner` a request continues: by hint (the session's
        own id, or a client id), else by the messages before the last user
        turn. Keys are per owner, and another owner's session id finds nothing."""
        sid = None
        if hint:
            s = self.by_id.get(hint)
            sid = hint if s is not None and s.owner == owner else self.by_key.get(_scoped("h:", owner, hint))
        elif messages is not None:
            head = before_last_user(messages)
            if head is not None:
                sid = self.by_key.get(_scoped("", owner, prefix_key(head)))
        s = self.by_id.get(sid) if sid is not None else None
        return s if s is not None and s.owner == owner else None

    def add(self, s: Chat, hint: str | None = None) -> None:
        if hint:
            self._key(s, _scoped("h:", s.owner, hint))
        self.by_id[s.id] = s

    def remember_turn(self, s: Chat, messages: list[dict], reply: str) -> None:
        """After a completed chat turn: the next turn's prefix leads here."""
        self._key(s, _scoped("", s.owner, prefix_key(messages + [{"role": "assistant", "content": reply}])))

    def _key(self, s: Chat, k: str) -> None:
        self.by_key[k] = s.id
        s.keys.append(k)

    def forget(self, s: Chat) -> None:
        self.by_id.pop(s.id, None)
        for k in s.keys:
            if self.by_key.get(k) == s.id:
                del self.by_key[k]

    def expired(self, now: float, ttl: float) -> list[Chat]:
        """Idle past their own ttl (else `ttl`) and not in a turn."""
        return [s for s in self.by_id.values()
                if now - s.last_used > (ttl if s.ttl is None else s.ttl) and not s.lock.locked()]
