"""The router's placement front end: the same assertions on the test fake
(tests/fakes.FakeFrontend) and the real trunk (node.trunk.TrunkFrontend)."""

from __future__ import annotations

import pytest

import fakes
from mlxmoe.bundle.split import split
from mlxmoe.errors import MlxMoeError
from mlxmoe.node.contract import Frontend
from mlxmoe.node.trunk import TrunkFrontend


@pytest.fixture(scope="module")
def bundle(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("frontend") / "b"
    split(str(ckpt("qwen3_moe")), out, 2, bits=None, trunk_bits=None)
    return out


@pytest.fixture(params=["fake", "trunk"])
def frontend(request, bundle) -> Frontend:
    if request.param == "fake":
        return fakes.FakeFrontend(n_groups=2)
    return TrunkFrontend.load(bundle)


def test_identity_and_tokens(frontend):
    m = frontend.manifest
    assert isinstance(m.model_id, str) and isinstance(m.hash, str) and m.n_groups == 2
    chat = frontend.encode_chat([{"role": "user", "content": "hello"}])
    assert chat and all(isinstance(t, int) for t in chat)
    assert frontend.encode("hello") and len(frontend.encode("hello")) <= len(chat)


def test_a_last_assistant_message_can_be_continued(frontend):
    """`add_generation_prompt=False, continue_final_message=True`: the prompt ends with the assistant's
    open text (Anthropic's prefill), where an answered turn would have opened a new one."""
    user = [{"role": "user", "content": "hello"}]
    opened = frontend.encode_chat(user + [{"role": "assistant", "content": "Sure, the"}],
                                  add_generation_prompt=False, continue_final_message=True)
    answered = frontend.encode_chat(user)
    assert opened[:len(answered)] == answered and len(opened) > len(answered)
    assert frontend.encode("Sure, the")[-1] == opened[-1]  # the last token is the message's, no turn end after it


def test_score(frontend):
    tokens = frontend.encode_chat([{"role": "user", "content": "the quick brown fox"}])
    s = frontend.score(tokens)
    assert set(s.scores) == {0, 1} and all(isinstance(v, float) for v in s.scores.values())
    assert s.best in (0, 1) and s.layers and s.n_tokens == len(tokens)
    assert frontend.score(tokens).scores == s.scores  # deterministic
    with pytest.raises(MlxMoeError, match="no tokens"):
        frontend.score([])
