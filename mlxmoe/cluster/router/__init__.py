"""The router: places each new conversation on the node whose expert group
fits it best, pins it there, streams tokens back, and re-places it if that
node goes away.

Placement: the trunk front end scores every group once per new conversation
(S(g), model/placement.py); candidates are live nodes ordered by their best group's
rank (groups within `tie_margin` of the best count as tied), then by load.
A node that answers 503 (KV budget full) is skipped for its Retry-After.

Pinning: a conversation is found again by the client's session id (header
X-Session-Id, or `session_id`/`user` in the body), or by the hash of its
messages before the last user turn (registered after each completed turn).

Failover: when the node fails mid-stream, the turn continues on the next
candidate from the transcript (prompt + tokens already sent), with the
remaining max_tokens, so the client sees every token exactly once.

Modes (per session, chosen per request or by the router's default; their
names and the node routing each maps to: mlxmoe/modes.py):
  pin     decode on the placed node, strictly local (the default)
  soft    pin; at turn boundaries (and every `check_every` tokens) S(g) is
          re-scored on the transcript's last `window` tokens (the newest
          topic, not the whole history's mean); a group that beats the current one by
          `margin` for `checks` consecutive checks becomes the session's
          expert group: the node keeps trunk and KV and calls that group's
          node for every MoE layer (routing="group")
  hard    the same rule, but the session's KV moves to a node of the winning
          group (export -> import -> re-pin -> close the old copy) while the
          session is young (<= `hard_max_tokens`); otherwise as soft. A move
          that fails midway leaves the session where it was (or, if the old
          node died, rebuilds it from the transcript on the new one)
  onehop  pin; the node picks, per MoE layer and token, the group with the
          most top-k mass (routing="onehop", peers = one live node per group)
  split   as onehop, but top-k over the node's own experts united with the
          picked group's; only the chosen experts it lacks run remotely
          (routing="split")
  race    2-3 nodes of the best-scoring groups each generate `race_tokens`
          tokens of the first answer; the best mean log-prob is pinned, its
          tokens streamed, the others' sessions closed

Files: ranking.py (pure ranking of nodes), chats.py (Chat, the index),
fleet.py (Fleet: peers, clients, probing, busy marks, candidates),
context.py (TurnContext: what turn, race and migration use), turn.py (Turn,
Rejected), migration.py (soft/hard), race.py, quality_watch.py (acting on
the nodes' quality meter), core.py (Router: chats, turns, wiring).
"""

from mlxmoe.cluster.router.chats import Chat
from mlxmoe.cluster.router.core import Router
from mlxmoe.cluster.router.turn import Rejected, Turn

__all__ = ["Chat", "Rejected", "Router", "Turn"]
