"""One chat never hurts another: a hostile tool schema beside running streams on the same node
(through the API and as a signed RPC straight to the node) is refused alone and fast, and every
other stream ends with exactly its own text."""

from __future__ import annotations

import asyncio
import threading
import time

import aiohttp
import openai
import pytest

from fakes import HASH, FakeEngine, LocalCluster, encode_chat, expected_text
from mlxmoe.cluster.client import NodeClient
from mlxmoe.errors import RpcError

pytestmark = pytest.mark.timeout(120)
HOSTILE = [{"type": "function", "function": {"name": "f", "parameters": {"$ref": "#"}}}]


def test_a_hostile_schema_is_refused_alone_while_other_streams_go_on():
    with LocalCluster([FakeEngine(group=0, n_groups=1, delay=0.02)], tls=None) as c:
        cl = openai.OpenAI(base_url=c.api_url + "/v1", api_key="x", max_retries=0, timeout=60)
        victims, got = [f"victim {i}" for i in range(6)], {}

        def stream(text):
            msgs = [{"role": "user", "content": text}]
            s = cl.chat.completions.create(model="fake-moe", messages=msgs, max_tokens=60, stream=True)
            got[text] = "".join(ch.choices[0].delta.content or "" for ch in s if ch.choices)

        threads = [threading.Thread(target=stream, args=(v,)) for v in victims]
        for t in threads:
            t.start()
        time.sleep(0.3)  # they are decoding
        t0 = time.perf_counter()
        with pytest.raises(openai.BadRequestError) as e:
            cl.chat.completions.create(model="fake-moe", messages=[{"role": "user", "content": "x"}], max_tokens=8,
                                       tools=HOSTILE, tool_choice="required")
        api_s = time.perf_counter() - t0
        assert "tools[0].function.parameters" in str(e.value) and api_s < 3

        async def rpc():  # a member (holding the key) sends the same grammar straight to the node
            async with aiohttp.ClientSession() as http:
                client = NodeClient(http, c.node_url(0), c.key, HASH)
                params = {"max_tokens": 8, "grammar": {"type": "tool_call", "tools": HOSTILE, "choice": "required"}}
                with pytest.raises(RpcError) as ei:
                    async for _ in client.generate("hostile", [1, 2, 3], params):
                        pass
                return ei.value
        err = c.run(rpc())
        assert err.status == 400 and "parameters" in err.message
        for t in threads:
            t.join(60)
        for v in victims:
            assert got[v] == expected_text(encode_chat([{"role": "user", "content": v}]), 60)
