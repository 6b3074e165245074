"""The names of the routing modes, and how a router mode maps to a node's.

A base module (usable by every layer): the router (cluster/router/) picks
one *router mode* per session; each generate call tells the node one *node
routing* (node/remote/: where each MoE layer's routed experts run).

Router modes (per session; cluster/router/__init__.py says what each does):
  pin, soft, hard, onehop, split, race
Node routing modes (GenParams.routing; node/remote/__init__.py):
  local, group, onehop, split
The mapping: onehop and split are the same name on both sides; a soft/hard
session whose expert group is not its home group decodes with "group";
everything else (pin, race, a soft/hard session at home) is "local".
"""

from __future__ import annotations

ROUTER_MODES = ("pin", "soft", "hard", "onehop", "split", "race")
DEFAULT_MODE = "pin"  # a request that names no mode, on a router configured with none
ROUTING_MODES = ("local", "group", "onehop", "split")
MIGRATING = ("soft", "hard")  # router modes that re-score and move the session's experts
PER_LAYER = ("onehop", "split")  # router modes the node carries out itself, per MoE layer


def node_routing(mode: str, expert_group: int | None, home_group: int | None) -> str:
    """The node routing a session in router `mode` decodes with."""
    if mode in PER_LAYER:
        return mode
    return "group" if expert_group is not None and expert_group != home_group else "local"
