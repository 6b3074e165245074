"""OpenAI-compatible HTTP API of the router (aiohttp): openai.py (the
dialect: parsing, validation, response shapes), sse.py (streaming frames),
app.py (routes, handlers, start_router/serve_router)."""

from mlxmoe.cluster.api.app import serve_router, start_router

__all__ = ["serve_router", "start_router"]
