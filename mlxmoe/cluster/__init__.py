"""Cluster layer: cluster key, Bonjour discovery, the node RPC server and
client (their bytes: mlxmoe/wire.py), and the router with its
OpenAI-compatible API.

Nothing here imports MLX: the router and the tests run against anything that
offers the `Engine` protocol (mlxmoe.node.contract) or a placement front end.
"""
