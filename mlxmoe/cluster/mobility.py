"""Settings of the router's session modes (their names: mlxmoe/modes.py) and
their validation, from `mlxmoe serve --mode ...` and the `[router]` table of
the --peers TOML. Config loading stays here, in the cluster layer: only the
router reads these settings, while the mode names are shared with the node."""

from __future__ import annotations

from dataclasses import dataclass

from mlxmoe.modes import DEFAULT_MODE, ROUTER_MODES


@dataclass
class Mobility:
    """Router settings for the modes above (`[router]` in the --peers TOML)."""

    mode: str = DEFAULT_MODE  # default for requests that name none
    margin: float = 0.05  # S(challenger) - S(current) needed to count a check
    checks: int = 2  # consecutive winning checks before a switch (debounce)
    check_every: int = 0  # also re-score every N generated tokens (0: turn boundaries only)
    window: int = 512  # re-score the transcript's last N tokens (0: all): follows a change of topic
    hard_max_tokens: int = 2048  # move the KV only while the session holds at most this many tokens
    race_tokens: int = 8
    race_candidates: int = 3
    migrate_timeout: float = 30.0  # seconds for one export or import
    tie_margin: float = 0.02  # placement: groups within this of the best score tie, and go to the least loaded node
    meter_threshold: float = 0.0  # quality meter below this for meter_checks turns: re-place, then split (0: off)
    meter_checks: int = 2

    LIMITS = {"tie_margin": (0.0, 1.0), "margin": (0.0, 1.0), "checks": (1, 100), "check_every": (0, 1 << 20), "window": (0, 1 << 20),
              "hard_max_tokens": (0, 1 << 24), "race_tokens": (1, 256), "race_candidates": (2, 3),
              "migrate_timeout": (0.1, 3600.0), "meter_threshold": (0.0, 1.0), "meter_checks": (1, 100)}

    @classmethod
    def from_dict(cls, d: dict, where: str = "router") -> "Mobility":
        """Validated settings; a bad value raises ValueError naming the field."""
        out = cls()
        for k, v in d.items():
            if k not in cls.__dataclass_fields__:
                raise ValueError(f"{where}.{k}: unknown setting (known: {', '.join(cls.__dataclass_fields__)})")
            if k == "mode":
                if v not in ROUTER_MODES:
                    raise ValueError(f"{where}.mode: must be one of {', '.join(ROUTER_MODES)}, got {v!r}")
            else:
                kind = float if isinstance(getattr(out, k), float) else int
                lo, hi = cls.LIMITS[k]
                ok = isinstance(v, (int, float) if kind is float else int) and not isinstance(v, bool)
                if not ok or not lo <= v <= hi:
                    raise ValueError(f"{where}.{k}: must be {'a number' if kind is float else 'an integer'} "
                                     f"in {lo}..{hi}, got {v!r}")
                v = kind(v)
            setattr(out, k, v)
        return out

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def load_router_config(path: str) -> dict:
    """The `[router]` table of the --peers TOML file ({} if none)."""
    import tomllib

    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"config file {path}: {e}") from None
    table = data.get("router", {})
    if not isinstance(table, dict):
        raise ValueError(f"config file {path}: [router] must be a table")
    Mobility.from_dict(table, f"{path}: router")  # validate now, with the file's name
    return table
