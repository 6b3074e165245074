"""The router's front end: the trunk alone (no experts) + the tokenizer, to
score placement from one set of router logits at the first MoE layer, which
the trunk computes exactly (nothing before that gate needs an expert)."""

from __future__ import annotations

import time

import mlx.core as mx

from mlxmoe.errors import MlxMoeError
from mlxmoe.model.placement import score_groups
from mlxmoe.model.placement import PlacementScores
from mlxmoe.model.load import WHOLE, Loaded, load_bundle, load_generation_config, load_tokenizer
from mlxmoe.model.moe import GateRecorder
from mlxmoe.params import SAMPLING_DEFAULTS, model_defaults
from mlxmoe.node.tokens import Tokens


def gate_logits(loaded: Loaded, tokens: list[int], layers: list[int] | None = None) -> dict:
    """Router logits {layer: [T, n_experts]} for `tokens`, stopping the forward
    pass at the last requested MoE layer (default: the first one)."""
    if not tokens:
        raise MlxMoeError("placement: the prompt has no tokens")
    layers = layers or loaded.manifest.moe_layers[:1]
    with GateRecorder(loaded.gates, stop_at=max(layers)) as rec:
        loaded.model(mx.array([tokens]))
    got = rec.by_layer()
    out = {l: got[l][0] for l in layers}
    mx.eval(out)
    return out


class TrunkFrontend(Tokens):
    """Implements node.contract.Frontend."""

    def __init__(self, loaded: Loaded, tokenizer, sampling_defaults: dict | None = None):
        self.loaded, self.tokenizer, self.manifest = loaded, tokenizer, loaded.manifest
        self.sampling_defaults = sampling_defaults or dict(SAMPLING_DEFAULTS)

    @classmethod
    def load(cls, bundle_dir, verify: bool = True) -> "TrunkFrontend":
        """The trunk, and the MoE layers every node holds whole (a layout's: placement scores after them)."""
        return cls(load_bundle(bundle_dir, None, experts=WHOLE, verify=verify), load_tokenizer(bundle_dir),
                   model_defaults(load_generation_config(bundle_dir)))

    def score(self, tokens: list[int]) -> PlacementScores:
        if self.manifest.n_groups == 1:  # every node serves the one group: nothing to choose, no trunk to run
            return PlacementScores({0: 1.0}, [], len(tokens))
        t0 = time.perf_counter()
        s = score_groups(self.manifest, gate_logits(self.loaded, tokens, self.manifest.placement_layers()))
        s.elapsed_ms = (time.perf_counter() - t0) * 1e3
        return s
