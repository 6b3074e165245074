"""Prompt prefixes shared across sessions (node/prefixes.py): a new session whose prompt starts like an idle
or closed session's prefills only the rest, and answers exactly as a node that never saw the prefix (greedy,
float32 and 8-bit KV); kept prefixes live within the KV budget and go before any session; KV computed with a
peer's experts is never shared."""

import pytest

import tiny
from mlxmoe.bundle.split import split
from mlxmoe.node.contract import GenParams
from mlxmoe.node.engine import Node
from mlxmoe.node.prefixes import MIN_SHARED
from test_runtime import Counting

SYSTEM = ("You are a careful assistant for a home lab. Answer briefly, cite the manual, never guess. "
          "Tools: weather, lights. ")


@pytest.fixture(scope="module", params=["float32", "kv8"])
def bundle(request, tmp_path_factory):
    src = tiny.make_checkpoint("qwen3_moe", tmp_path_factory.mktemp("src"), seed=3)
    out = tmp_path_factory.mktemp("b") / request.param
    if request.param == "float32":  # unquantized: exactness at full precision (gather_mm is float32-only on CPU)
        split(str(src), out, 2, bits=None, trunk_bits=None)
    else:
        split(str(src), out, 2, bits=4, group_size=32, trunk_bits=8, kv_bits=8)
    return out


def chat(node, text):
    return node.encode_chat([{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}])


def answer(node, sid, prompt, n=8):
    return [e.token for e in node.generate(sid, prompt, GenParams(max_tokens=n, temperature=0))]


def fed(node):
    c = Counting(node.model)
    node.model = node.batch.model = c
    return c


def test_a_new_chat_with_an_earlier_chats_prefix_prefills_only_the_rest_and_answers_the_same(bundle):
    node, fresh = Node.load(str(bundle), 0), Node.load(str(bundle), 0)
    first, second = chat(node, "What is the weather in Paris?"), chat(node, "Turn on the kitchen lights.")
    shared = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
    assert shared >= MIN_SHARED
    answer(node, "a", first)
    c = fed(node)
    got = answer(node, "b", second)  # "a" is idle: its KV up to the shared prefix is copied
    assert node.prefixes.hits == 1 and node.prefixes.tokens == shared
    assert c.fed <= len(second) - shared + len(got)
    assert got == answer(fresh, "b", second)
    assert node.sessions.sessions["a"].tokens[:len(first)] == first  # the donor's own cache is untouched
    assert answer(node, "a2", first) == answer(fresh, "a2", first)


def test_a_closed_chats_cache_is_kept_within_the_budget_and_dropped_before_any_session(bundle):
    node = Node.load(str(bundle), 0)
    first = chat(node, "What is the weather in Paris?")
    want = answer(Node.load(str(bundle), 0), "x", first)
    answer(node, "a", first)
    node.close_session("a")
    assert len(node.prefixes.kept) == 1 and node.prefixes.nbytes > 0
    assert node.sessions.used() >= node.prefixes.nbytes  # counted in the KV budget
    c = fed(node)
    assert answer(node, "b", first) == want  # the same prompt again: all but its last token reused
    assert node.prefixes.tokens == len(first) - 1 and c.fed <= 1 + len(want)
    node.close_session("b")
    node.sessions.budget = 2 * node.prefixes.nbytes - 1  # room for one more chat once the kept prefix goes
    answer(node, "c", chat(node, "Calendar?"))
    assert len(node.prefixes.kept) == 0 and node.sessions.sessions["c"].cache is not None


def test_kv_computed_with_a_peers_experts_is_not_shared(bundle):
    node = Node.load(str(bundle), 0)
    answer(node, "a", chat(node, "What is the weather in Paris?"))
    node.sessions.sessions["a"].local = False  # as after onehop or split borrowed a peer's experts
    answer(node, "b", chat(node, "Turn on the kitchen lights."))
    node.close_session("a")
    assert node.prefixes.hits == 0 and len(node.prefixes.kept) == 0
