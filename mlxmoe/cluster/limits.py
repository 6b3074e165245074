"""HTTP limits aiohttp has no option for, shared by the router's API and the
node server (docs/SECURITY.md)."""

from __future__ import annotations

from aiohttp import web


def cap_connections(server: web.Server, limit: int) -> None:
    """Close a new connection at once while `limit` are open: a flood of idle
    sockets cannot starve real clients for long, and each costs one file
    descriptor at most until the keep-alive timer. aiohttp's Server tracks the
    open connections; it has no cap of its own."""
    made = server.connection_made

    def connection_made(handler, transport) -> None:
        made(handler, transport)
        if len(server.connections) > limit:
            transport.abort()

    server.connection_made = connection_made
