"""Sampling parameters as pure functions: per-model defaults, the API's
parsing and refusals, the wire's bounds, special tokens in the text stream,
and deterministic placement."""

from types import SimpleNamespace

import msgpack
import pytest

from mlxmoe import wire
from mlxmoe.cluster.api import openai as oa
from mlxmoe.cluster.router import ranking as placement
from mlxmoe.params import SAMPLING_DEFAULTS, GenParams, model_defaults, resolve
from mlxmoe.node.stream import text_events


def _err(fn, *a):
    with pytest.raises(oa.ApiError) as e:
        fn(*a)
    assert e.value.status == 400
    return e.value


def test_model_defaults_from_generation_config():
    assert model_defaults(None) == SAMPLING_DEFAULTS
    assert SAMPLING_DEFAULTS["repetition_penalty"] == 1.1
    d = model_defaults({"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20, "repetition_penalty": 1.05})
    assert d == {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0, "repetition_penalty": 1.05}
    assert model_defaults({"do_sample": False, "temperature": 0.7})["temperature"] == 0.0  # greedy, as transformers
    assert model_defaults({"top_k": "x", "temperature": True, "top_p": -1}) == SAMPLING_DEFAULTS  # nonsense ignored


def test_resolve_fills_only_what_the_request_left_out():
    d = model_defaults({"do_sample": True, "temperature": 0.6, "top_k": 20})
    p = resolve(GenParams(max_tokens=4, temperature=None, top_p=None, top_k=None, min_p=None, repetition_penalty=None), d)
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.repetition_penalty) == (0.6, 1.0, 20, 0.0, 1.1)
    q = resolve(GenParams(max_tokens=4, temperature=0.0, top_k=None), d)
    assert (q.temperature, q.top_k, q.repetition_penalty) == (0.0, 20, 1.0)  # library defaults stay plain
    back = GenParams.from_dict(msgpack.unpackb(msgpack.packb(GenParams(logit_bias={"5": -100.0}, top_logprobs=3).to_dict())))
    assert back.logit_bias == {"5": -100.0} and back.top_logprobs == 3


def test_api_leaves_unset_sampling_to_the_model():
    p = oa.gen_params({"messages": []})
    assert p.temperature is None and p.top_p is None and p.repetition_penalty is None
    assert p.top_k is None and p.min_p is None and p.top_logprobs == 0 and p.logit_bias == {}
    p = oa.gen_params({"messages": [], "temperature": 0, "top_k": 5, "min_p": 0.1, "repetition_penalty": 1.2,
                       "presence_penalty": 1, "frequency_penalty": -1, "logit_bias": {"12": 100, "7": -3.5},
                       "logprobs": True, "top_logprobs": 4, "best_of": 1})
    assert p.temperature == 0.0 and p.top_k == 5 and p.min_p == 0.1 and p.repetition_penalty == 1.2
    assert p.presence_penalty == 1.0 and p.frequency_penalty == -1.0
    assert p.logit_bias == {"12": 100.0, "7": -3.5} and p.top_logprobs == 4
    assert oa.gen_params({"prompt": "x", "logprobs": 3}).top_logprobs == 3  # completions: logprobs is the count
    wire.check_schema(p.edit(max_tokens=5).to_dict(), wire.PARAMS_SCHEMA, "body.params")  # what the API sends, the wire takes


@pytest.mark.parametrize("body, param", [
    ({"best_of": 2}, "best_of"), ({"best_of": "2"}, "best_of"), ({"n": 3}, "n"),
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"repetition_penalty": "1"}, "repetition_penalty"),
    ({"min_p": 1.5}, "min_p"), ({"top_k": -1}, "top_k"), ({"top_k": 1.5}, "top_k"),
    ({"logit_bias": {"a": 1}}, "logit_bias"), ({"logit_bias": {"1": 101}}, "logit_bias"),
    ({"logit_bias": {"1": True}}, "logit_bias"), ({"logit_bias": [1]}, "logit_bias"),
    ({"logit_bias": {"-1": 1}}, "logit_bias"), ({"logit_bias": {"١": 1}}, "logit_bias"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"), ({"top_logprobs": 2}, "top_logprobs"),
    ({"temperature": 2.5}, "temperature"), ({"temperature": float("nan")}, "temperature"),
])
def test_refusals_name_the_parameter(body, param):
    assert _err(oa.gen_params, {"messages": [], **body}).param == param


def test_wire_bounds_of_the_sampling_fields():
    ok = {"max_tokens": 4, "temperature": None, "top_p": None, "top_k": 3, "min_p": 0.5, "repetition_penalty": 1.1,
          "presence_penalty": -2, "frequency_penalty": 2, "logit_bias": {"3": -100}, "top_logprobs": 20}
    wire._check_values("generate", {"params": ok})
    for k, v in [("top_k", -1), ("min_p", 2.0), ("presence_penalty", 3), ("top_logprobs", 21),
                 ("logit_bias", {"x": 1}), ("logit_bias", {"1": 1000}), ("repetition_penalty", float("nan"))]:
        with pytest.raises(wire.WireError) as e:
            wire._check_values("generate", {"params": {**ok, k: v}})
        assert k in e.value.message
    with pytest.raises(wire.WireError):
        wire.check_schema({**ok, "logit_bias": {"1": "a"}}, wire.PARAMS_SCHEMA, "body.params")


class Chars:
    """A detokenizer over character ids."""

    def reset(self):
        self.text = ""

    def add_token(self, t):
        self.text += chr(t)

    def finalize(self):
        pass


def test_special_tokens_add_no_text_and_eos_ends():
    steps = [(ord("a"), -0.1), (1000, -0.2), (ord("b"), -0.3, [{"token": 98, "text": "b", "logprob": -0.3}]), (999, -0.1)]
    ev = list(text_events(steps, Chars(), {999}, [], 10, special={1000}))
    assert [e.text for e in ev] == ["a", "", "b", ""] and ev[-1].finish_reason == "stop"
    assert ev[2].top_logprobs == [{"token": 98, "text": "b", "logprob": -0.3}] and ev[0].top_logprobs is None


def peer(name, groups, inflight=0):
    return SimpleNamespace(name=name, url=f"http://{name}", groups=groups, inflight=inflight, streams=0, queued=0,
                           active_sessions=0, free_memory=0)


def test_deterministic_requests_never_spread_across_tied_groups():
    scores = {0: 0.50, 1: 0.505, 2: 0.49}  # all within the tie margin
    ranked = [1, 0, 2]
    g1_busy = [peer("a", [0]), peer("b", [1], inflight=3), peer("c", [2]), peer("d", [1], inflight=1)]
    spread = placement.rank_candidates(g1_busy, scores, ranked, 0.02, {}, 0.0)
    assert spread[0].name in ("a", "c")  # load picks among tied groups
    for key in range(10):  # tied groups by score (the prompt's key breaks exact ties); replicas by load
        det = [p.name for p in placement.rank_candidates(g1_busy, scores, ranked, 0.02, {}, 0.0, deterministic=True,
                                                         tie_key=key)]
        assert det == ["d", "b", "a", "c"]
    exact = {0: 0.5, 1: 0.5, 2: 0.5}
    firsts = {placement.rank_candidates(g1_busy, exact, ranked, 0.02, {}, 0.0, deterministic=True, tie_key=k)[0].name
              for k in range(40)}
    assert firsts == {"a", "d", "c"}  # an exact tie: different prompts spread over the groups
    assert placement.deterministic(GenParams(temperature=0.0)) and placement.deterministic(GenParams(temperature=1, seed=3))
    assert not placement.deterministic(GenParams(temperature=None)) and not placement.deterministic(GenParams(temperature=0.7))
    # left out: the model's default, greedy unless its generation_config samples
    assert placement.deterministic(GenParams(temperature=None), SAMPLING_DEFAULTS)
    assert not placement.deterministic(GenParams(temperature=None), model_defaults({"do_sample": True, "temperature": 0.6}))
