"""Access logs: one line per request, on the router (its API's middleware)
and on a node (node_server.py). A line is built from a plain dict, so the
same fields reach a text log (`key=value ...`) and a JSON one (`--log-json`:
one object per line, the fields as keys). Sessions appear by their short
ref (sessionview.session_ref), never by their id: an id resumes a session.

Below both the node server and the router's API, so neither imports the other."""

from __future__ import annotations

import json
import logging
import time

log = logging.getLogger("mlxmoe.access")

# the order of a text line; other fields follow in their own order
FIELDS = ("method", "path", "op", "status", "session", "node", "group", "mode", "prompt_tokens",
          "completion_tokens", "ttft_s", "tok_s", "finish_reason", "ms")


def _value(v) -> str:
    s = v if isinstance(v, str) else json.dumps(v)
    return json.dumps(s) if (not s or any(c in s for c in ' "=\n')) else s


def format_line(d: dict) -> str:
    """`key=value` pairs, FIELDS first; None values are left out; values with
    spaces, quotes or `=` are JSON-quoted, so a line always splits back."""
    keys = [k for k in FIELDS if k in d] + [k for k in d if k not in FIELDS]
    return " ".join(f"{k}={_value(d[k])}" for k in keys if d[k] is not None)


def emit(d: dict, quiet: bool = False, logger: logging.Logger = log) -> None:
    """Log one access line (the dict rides along for the JSON formatter)."""
    logger.log(logging.DEBUG if quiet else logging.INFO, "%s", format_line(d), extra={"access": d})


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, msg, and an access
    line's fields as keys of their own."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 3), "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
               "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        fields = getattr(record, "access", None)
        if isinstance(fields, dict):
            out.update({k: v for k, v in fields.items() if k not in out})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)
