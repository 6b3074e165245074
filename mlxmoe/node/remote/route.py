"""A session's remote route: the MoE block hook that sends one layer's hidden
states to at most one peer per token (group, onehop, split), and the per-node
state that makes routes (package docstring: the modes and the contract)."""

from __future__ import annotations

import time

import mlx.core as mx
import numpy as np

from mlxmoe import wire
from mlxmoe.errors import MlxMoeError, PeerError
from mlxmoe.modes import ROUTING_MODES
from mlxmoe.model.moe import hooked, own_code, replaced_child, row_table, state_of, unhooked
from mlxmoe.node.remote.choose import candidate_sets, group_order, onehop_pick, set_masks
from mlxmoe.node.remote.peers import Inbox, PeerLink
from mlxmoe.node.remote.ring import FallbackLink

SHARED_ATTRS = ("shared_expert", "shared_experts")  # qwen2_moe, deepseek_v3 / kimi
MAX_CALL_BYTES = 32 << 20  # split a prefill chunk's hidden states above this (the op allows 64 MiB)


def _zeros_like_input(x):
    return mx.zeros_like(x)


def routed_local(block, x: mx.array) -> mx.array:
    """The block's routed-expert output for x with this node's masked routing
    (its own gate, selection rule and experts): the block's own code, with
    its shared experts (trunk, computed by the caller) contributing zero."""
    shared = [a for a in SHARED_ATTRS if a in block]
    if not shared:
        return unhooked(block, x)
    with replaced_child(block, shared[0], _zeros_like_input):
        return unhooked(block, x)


def shared_part(block, experts_attr: str, x: mx.array) -> mx.array | None:
    """The block's shared-expert output (None if it has none): its own code
    with the routed experts contributing zero."""
    if not any(a in block for a in SHARED_ATTRS):
        return None
    with own_code(block), replaced_child(block, experts_attr, lambda h, inds: mx.zeros(inds.shape + (h.shape[-1],), h.dtype)):
        return unhooked(block, x)


def full_logits(gate, x: mx.array) -> mx.array:
    """Router logits over all experts (a node's Linear gate keeps its full twin in its state)."""
    full = state_of(gate).full
    return full(x) if full is not None else x @ gate.weight.T


def _stats(mode: str, expert_group) -> dict:
    return {"routing": mode, "expert_group": expert_group, "remote_calls": 0, "remote_bytes": 0,
            "remote_s": 0.0, "local_steps": 0}


class Remote:
    """A node's remote-experts state: cluster key, peer connections, inbox,
    per-session counters."""

    def __init__(self, loaded):
        self.loaded, self.m = loaded, loaded.manifest
        self.key: bytes | None = None
        self.inbox = Inbox()
        self.links: dict[str, PeerLink] = {}
        self.stats: dict[str, dict] = {}
        self.ring = None  # a RingGroup when this node joined one (`mlxmoe node --ring`, node/remote/ring.py)
        self.routes: dict[str, Route | None] = {}  # each session's latest route (the prefill op reuses it)
        # per MoE layer: global expert id -> row in this node's experts (-1: not held)
        self.rows = {l: row_table(ids, self.m.n_experts) for l, ids in loaded.local_ids.items()}

    def link(self, url: str, group: int) -> PeerLink:
        if url not in self.links:
            http = PeerLink(url, self.key, self.m.hash, self.inbox, name=f"group {group} at {url}")
            in_ring = self.ring is not None and group in self.ring.socks  # ranks are group numbers
            self.links[url] = FallbackLink(self.ring.link(group, http.name), http) if in_ring else http
        return self.links[url]

    def forget(self, sid: str) -> None:
        self.stats.pop(sid, None)
        self.routes.pop(sid, None)

    def last_route(self, sid: str) -> "Route | None":
        return self.routes.get(sid)

    def route(self, sid: str, params) -> "Route | None":
        self.routes[sid] = r = self._route(sid, params)
        return r

    def _route(self, sid: str, params) -> "Route | None":
        """The routing of one generation (None: all local). Raises
        MlxMoeError for params that cannot be served, before any token."""
        mode, home, eg = params.routing or "local", self.loaded.group, params.expert_group
        if mode not in ROUTING_MODES:
            raise MlxMoeError(f"routing: {mode!r} is not one of {', '.join(ROUTING_MODES)}")
        if mode == "split" and self.m.moe["scoring"] == "sigmoid_group":
            raise MlxMoeError("routing: 'split' needs a Linear router (this model routes by sigmoid groups)")
        peers = {}
        for g, url in (params.peers or {}).items():
            if not str(g).isdigit() or not 0 <= int(g) < self.m.n_groups:
                raise MlxMoeError(f"peers: {g!r} is not a group of this model (0..{self.m.n_groups - 1})")
            peers[int(g)] = url
        if mode == "group" and (eg is None or not 0 <= eg < self.m.n_groups):
            raise MlxMoeError(f"expert_group: {eg!r} is not a group of this model (0..{self.m.n_groups - 1})")
        st = self.stats.setdefault(sid, _stats(mode, eg))
        st["routing"], st["expert_group"] = mode, eg if mode == "group" else None
        if home is None or mode == "local" or (mode == "group" and eg == home):
            return None  # a full-model node or the own group: nothing is remote
        targets = [eg] if mode == "group" else [g for g in peers if g != home]
        missing = [g for g in targets if g not in peers]
        if missing:
            raise MlxMoeError(f"peers: routing {mode!r} needs a node URL for group {missing[0]}")
        if not targets:
            return None  # onehop with no other group reachable
        if self.key is None:
            raise MlxMoeError("remote routing needs the cluster key (start the node with `mlxmoe node`)")
        links = {g: self.link(peers[g], g) for g in targets}
        return Route(self, mode, home, links, st)


class Route:
    def __init__(self, remote: Remote, mode: str, home: int, links: dict, stats: dict):
        self.r, self.mode, self.home, self.links, self.stats = remote, mode, home, links, stats
        loaded = remote.loaded
        self.arch, self.m = loaded.arch, loaded.manifest
        self.order = group_order(home, links)
        split = mode == "split"
        self.sets = {l: candidate_sets(self.m, home, self.order, l, split) for l in self.m.moe_layers}
        if split:
            self.masks = {l: set_masks(self.sets[l], self.m.n_experts) for l in self.m.moe_layers}
        blocks = loaded.blocks
        self.blocks = [blocks[l] for l in self.m.moe_layers]
        self.hooks = [self._hook_for(l) for l in self.m.moe_layers]

    def active(self):
        """This route's hooks on the MoE blocks for the span of one step."""
        return hooked(self.blocks, self.hooks)

    def _hook_for(self, layer: int):
        if self.mode == "group":
            (g,) = self.links

            def hook(block, x):
                return self._with_shared(block, x, self.call(g, layer, x))
        elif self.mode == "split":
            def hook(block, x):
                return self._split(block, layer, x)
        else:
            def hook(block, x):
                return self._with_shared(block, x, self._onehop(block, layer, x))
        return hook

    def _with_shared(self, block, x, y):
        s = shared_part(block, self.arch.experts, x)
        return y if s is None else y + s

    def _onehop(self, block, layer: int, x: mx.array) -> mx.array:
        gate = getattr(block, self.arch.gate)
        pick = np.array(onehop_pick(full_logits(gate, x), self.m.moe["scoring"], self.sets[layer], self.m.top_k))
        pick = pick.reshape(-1)
        used = sorted(set(pick.tolist()))
        if used == [0]:
            self.stats["local_steps"] += 1
            return routed_local(block, x)
        flat = x.reshape(-1, x.shape[-1])
        parts, index = [], []
        for i in used:
            rows = np.nonzero(pick == i)[0]
            xs = flat[mx.array(rows)][None]
            if i == 0:
                self.stats["local_steps"] += 1
                parts.append(routed_local(block, xs)[0])
            else:
                parts.append(self.call(self.order[i], layer, xs)[0])
            index.append(rows)
        inverse = np.argsort(np.concatenate(index))
        return mx.concatenate(parts, axis=0)[mx.array(inverse)].reshape(x.shape)

    def _split(self, block, layer: int, x: mx.array) -> mx.array:
        """The block's own code (shared experts included) with its router over
        every expert, masked per token to home ∪ the picked group, and its
        experts module split: held rows here, the rest on the picked node."""
        gate, experts = getattr(block, self.arch.gate), getattr(block, self.arch.experts)
        logits = full_logits(gate, x)
        pick = onehop_pick(logits, self.m.moe["scoring"], self.sets[layer], self.m.top_k)
        mask = self.masks[layer][pick]
        split = _SplitExperts(self, layer, experts, np.array(pick).reshape(-1))
        with own_code(block), replaced_child(block, self.arch.gate, lambda h: logits + mask), \
                replaced_child(block, self.arch.experts, split):
            return unhooked(block, x)

    def call(self, group: int, layer: int, x: mx.array, ids: list[int] | None = None,
             rows: list[int] | None = None) -> mx.array:
        """Routed-expert output of `layer` for x, computed by `group`'s node
        (with `ids`: expert ids[i] applied to row rows[i] of x, unweighted,
        one output row per id; the caller keeps such a call under the limit)."""
        if ids is not None:
            return self._call_once(group, layer, x, {"ids": ids, "rows": rows}, len(ids))
        step = max(1, MAX_CALL_BYTES // max(1, x.shape[-1] * x.dtype.size))
        flat = x.reshape(-1, x.shape[-1])
        outs = [self._call_once(group, layer, flat[i:i + step], {}, min(step, flat.shape[0] - i))
                for i in range(0, flat.shape[0], step)]
        y = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=0)
        return y.reshape(x.shape)  # in the dtype the block computes (as the local block would return it)

    def _call_once(self, group: int, layer: int, x: mx.array, extra: dict, n_out: int) -> mx.array:
        t0 = time.perf_counter()
        body = {"layer": layer, "x": wire.encode_tensor(x), **{k: v for k, v in extra.items() if v is not None}}
        body, n = self.links[group].call("experts", body)
        self.stats["remote_calls"] += 1
        self.stats["remote_bytes"] += n
        self.stats["remote_s"] += time.perf_counter() - t0
        y = body.get("y") if isinstance(body, dict) else None
        if not isinstance(y, dict) or y.get("shape") != [n_out, x.shape[-1]]:
            raise PeerError(f"peer {self.links[group].name}: experts answer has the wrong shape", self.links[group].name)
        return wire.decode_tensor(y)


class _SplitExperts:
    """Stands in for a block's experts module during a "split" step: slots
    whose expert is held here run on the local experts, the others go to the
    token's picked node in one call (each token's hidden state once, with
    the expert ids and the row each applies to)."""

    def __init__(self, route: Route, layer: int, experts, pick: np.ndarray):
        self.route, self.layer, self.experts, self.pick = route, layer, experts, pick

    def __call__(self, h, inds):
        rows = self.route.r.rows[self.layer]
        ids = np.array(inds).reshape(len(self.pick), -1)  # [tokens, k] global ids
        local = rows[ids]
        if (local >= 0).all():
            self.route.stats["local_steps"] += 1
            return self.experts(h, mx.array(local.reshape(inds.shape).astype(np.int32)))
        k, hid = ids.shape[1], h.shape[-1]
        flat_x, flat_ids = h.reshape(-1, hid), ids.reshape(-1)
        here, away = np.nonzero(local.reshape(-1) >= 0)[0], np.nonzero(local.reshape(-1) < 0)[0]
        flat_y = mx.zeros((ids.size, hid), h.dtype)
        if here.size:  # only the slots held here run here
            idx = mx.array(local.reshape(-1)[here].astype(np.int32))[:, None]
            flat_y[mx.array(here)] = self.experts(flat_x[mx.array(here // k)], idx)[:, 0]
        per_call = max(1, MAX_CALL_BYTES // (hid * h.dtype.size))  # tokens per call
        for i in sorted(set(self.pick[away // k].tolist())):
            slots = away[self.pick[away // k] == i]
            for t0 in range(0, len(self.pick), per_call):
                part = slots[(slots // k >= t0) & (slots // k < t0 + per_call)]
                if part.size == 0:
                    continue
                tokens, rows = np.unique(part // k, return_inverse=True)
                out = self.route.call(self.route.order[i], self.layer, flat_x[mx.array(tokens)],
                                      flat_ids[part].tolist(), rows.tolist())
                flat_y[mx.array(part)] = out.astype(flat_y.dtype)
        return flat_y.reshape(*inds.shape, hid)
