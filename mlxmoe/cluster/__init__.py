"""Cluster layer: wire format (msgpack RPC + HMAC), cluster key, Bonjour
discovery, the node RPC server, and the router with its OpenAI-compatible API.

Nothing here imports MLX: the router and the tests run against anything that
offers the `Engine` protocol (mlxmoe.node.contract) or a placement front end.
"""
