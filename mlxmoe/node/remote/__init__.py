"""Remote routed experts: a node runs a session's trunk and KV, and sends one
MoE layer's hidden states to at most one other node (one destination per
layer and token, never all-to-all).

Modes (GenParams.routing, per request):
- "local"  (default): every MoE layer uses this node's masked experts.
- "group":  soft migration. Every MoE layer's routed experts run on the node
            of `expert_group` (routed as that node's own masked block would);
            shared experts, gates and attention stay here. expert_group equal
            to this node's group is plain local decoding.
- "onehop": per MoE layer and token, the group (this one, or one of `peers`)
            whose eligible set holds the most top-k router mass (model/placement.py's
            topk_mass of the full router) computes the routed experts; ties go
            to this node. Candidates: this node's group + the groups in peers.
- "split":  per MoE layer and token, top-k over this node's eligible set
            united with ONE other group's (the union holding the most top-k
            mass); the chosen experts this node holds run here, the others on
            that group's node (the `experts` op with `ids`). Closest to the
            full model (docs/QUALITY.md); Linear routers only.
A prompt chunk goes in one call per layer ("group"), or one call per layer
and chosen group ("onehop", "split": each token still reaches one remote node
at most).

Contract with the router (cluster/router/):
- generate params: {"routing": "local"|"group"|"onehop"|"split", "expert_group": int|None,
  "peers": {str(group): node URL}}; a mode that needs a peer it was not given
  fails before the first token (HTTP 400 naming the field).
- node info: info()["session_stats"][session_id] = {"routing", "expert_group",
  "remote_calls", "remote_bytes", "remote_s", "local_steps"}: cumulative per
  session (bytes = HTTP requests + responses, headers included; local_steps =
  onehop layer steps that stayed local). "sessions" stays the session count.
- a peer failing mid-generation raises PeerError (cluster: HTTP 502 /
  error frame "peer_failed", retryable) naming the peer; the session's cache
  is left holding exactly the tokens before the failed step.

Node to node: the `experts` RPC op (mlxmoe/wire.py) over one persistent
keep-alive HTTP connection per peer, signed with the cluster key exactly as
wire.encode_request does. Calls are made from the engine thread; while it
waits, that thread serves experts requests from other nodes (the Inbox), so
two nodes calling each other never deadlock.
"""
