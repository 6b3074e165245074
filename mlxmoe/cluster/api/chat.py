"""The request path every dialect shares (docs/ARCHITECTURE.md, "The request path"): a dialect's adapter
parses its body once into a `ChatRequest` (or a `PromptRequest`), `start` turns it into a running `Reply`
(tools and answer format -> the chat template and a grammar; the prompt's tokens checked; a session placed;
a turn opened), and the adapter writes the reply's parts in its own shape.

Messages travel in one neutral form, OpenAI's (tools.py renders it for the chat template):
{"role": "system"|"user"|"assistant"|"tool", "content": str, "tool_calls"?: [{"id", "type": "function",
"function": {"name", "arguments": JSON text}}], "tool_call_id"?: str}. A dialect's own shapes
(Anthropic's content blocks, Ollama's argument objects) are converted on the way in and out."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator

from mlxmoe.cluster.api import fields
from mlxmoe.cluster.api import tools as tl
from mlxmoe.errors import MlxMoeError, api_error
from mlxmoe.params import GenParams

if TYPE_CHECKING:
    from mlxmoe.cluster.router import Chat, Router, Turn


@dataclass
class Routing:
    """mlxmoe's own options of a request, in any dialect (fields.session_hint, requested_mode/prefer)."""
    hint: str | None = None  # the client's session id
    mode: str | None = None  # the routing mode asked for, else the session's own
    prefer: str | None = None  # "quality" | "speed": where a new chat goes


@dataclass
class ChatRequest:
    messages: list[dict]  # the neutral form (above)
    params: GenParams  # its grammar is set by `start` from the tools or the answer format
    tools: list[dict] | None = None  # [{"type": "function", "function": {name, description?, parameters}}]
    tool_choice: Any = None  # "auto" | "none" | "required" | {"type": "function", "function": {"name": ...}}
    answer_format: dict | None = None  # a grammar spec of the whole answer (json_object, json_schema)
    routing: Routing = field(default_factory=Routing)
    where: str = "messages"  # the request field a refusal of the prompt names
    continue_last: bool = False  # the last message is the start of the answer (Anthropic's prefill): continued


@dataclass
class PromptRequest:
    """A raw prompt, no chat template (OpenAI's completions, Ollama's generate with raw)."""
    prompt: str | list[int]
    params: GenParams
    routing: Routing = field(default_factory=Routing)
    where: str = "prompt"


@dataclass
class Part:
    """A piece of the answer as it comes: text, or (when tools may be called) one whole call in the neutral
    form; `frame` is the node's token frame it came with (token, logprob, top), on the first part of a token."""
    text: str = ""
    call: dict | None = None
    frame: dict | None = None


@dataclass
class Reply:
    """An answer in flight. Read `parts()` once (or `collect()`), then `close()` (always: a finally)."""
    router: Router
    session: Chat
    turn: Turn
    messages: list[dict] | None  # the chat's messages as the client sent them: remembered with the answer
    parse_calls: bool = False  # the answer may hold tool calls
    opening: str = ""  # the answer's start the client sent (continue_last): remembered before the reply
    calls: int = 0

    async def parts(self) -> AsyncIterator[Part]:
        """The answer's parts; raises RpcError when the nodes fail mid-answer (after any failover)."""
        parser, text = tl.ToolCallParser() if self.parse_calls else None, []
        async for f in self.turn.events():
            text.append(f["text"])
            if parser is None:
                yield Part(f["text"], None, f)
                continue
            events = parser.feed(f["text"]) or [{"content": ""}]
            for i, e in enumerate(events):  # the token's frame once, with its first part
                yield self._part(e, f if i == 0 else None)
        for e in parser.finish() if parser else []:
            yield self._part(e, None)
        if self.messages is not None:
            reply = self.opening + "".join(text)
            self.router.remember_turn(self.session, self.messages,
                                      tl.parse_tool_calls(reply)[0] if parser else reply)

    def _part(self, e: dict, frame: dict | None) -> Part:
        call = e.get("tool_call")
        self.calls += call is not None
        return Part(e.get("content", ""), call, frame)

    async def collect(self) -> tuple[str, list[dict], list[dict]]:
        """The whole answer: (text, tool calls without their streaming index, token frames)."""
        text, calls, frames = [], [], []
        async for p in self.parts():
            text.append(p.text)
            if p.call is not None:
                calls.append({k: v for k, v in p.call.items() if k != "index"})
            if p.frame is not None:
                frames.append(p.frame)
        return "".join(text), calls, frames

    @property
    def finish_reason(self) -> str:
        """"stop" | "length" | "tool_calls" (the answer ended, not cut off, with calls)."""
        reason = self.turn.finish_reason or "length"
        return "tool_calls" if self.calls and reason == "stop" else reason

    async def stop_sequence(self) -> str | None:
        """Which of the request's stop strings ended the answer (once it is read), or None (its end token,
        max_tokens, calls). The node says "stop" alike for an end token and a stop string, and cuts the text
        before the string, so the turn's tokens are decoded here (on the front end's thread, as it encodes):
        the node stops at the first place a stop string appears, so the earliest one in that text is the one
        (at one place, the shortest: it completed first). A stop string that the end token's own text spells
        reads as that stop sequence."""
        stops, decode = self.turn.params.stop, getattr(self.router.frontend, "decode", None)
        if self.finish_reason != "stop" or not stops or decode is None or not self.turn.generated:
            return None
        text = await self.router.worker.call(decode, list(self.turn.generated))
        hits = [(i, len(s), s) for s in stops if (i := text.find(s)) >= 0]
        return min(hits)[2] if hits else None

    @property
    def usage(self) -> tuple[int, int]:
        """(prompt tokens, generated tokens)."""
        return len(self.turn.prompt), len(self.turn.generated)

    def notice(self) -> dict | None:
        """What the client should know of how the answer ran (Turn.notice), for an "mlxmoe" field."""
        return self.turn.notice()

    @property
    def headers(self) -> dict:
        return self.router.headers(self.session)

    async def close(self) -> None:
        await self.turn.close()


# ---------------------------------------------------------------- start
async def start(router: Router, owner: str, req: ChatRequest | PromptRequest) -> Reply:
    """Tokens, session and turn of a request (every refusal an ApiError naming the field)."""
    if isinstance(req, ChatRequest):
        fields.check_messages_fit(req.messages, router.context_limit, req.where)
        messages, template_kwargs, grammar, parse = await asyncio.to_thread(_structured, router, req)
        remembered, opening = req.messages, ""
        if req.continue_last:  # the template leaves the last message open; the turn is remembered whole
            template_kwargs = {**template_kwargs, "add_generation_prompt": False, "continue_final_message": True}
            remembered, opening = req.messages[:-1], req.messages[-1]["content"]
        tokens = await router.encode_chat(messages, **template_kwargs)  # once: the same ids are scored and sent
    else:
        grammar, parse, remembered, opening = req.params.grammar, False, None, ""
        if isinstance(req.prompt, str):
            fields.check_chars(len(req.prompt), router.context_limit, req.where)
        tokens = req.prompt if isinstance(req.prompt, list) else await router.encode(req.prompt)
        if not tokens:
            raise api_error(MlxMoeError(f"'{req.where}' is empty"), req.where)
    fields.check_tokens(tokens, router.vocab_size, router.context_limit, req.where)
    fields.check_logit_bias(req.params.logit_bias, router.vocab_size)
    rt = req.routing
    try:
        s = await router.session_for(tokens, rt.hint, remembered, rt.mode, owner=owner, prefer=rt.prefer)
        turn = await router.open_turn(s, tokens, req.params.edit(grammar=grammar))
    except MlxMoeError as e:
        raise api_error(e, req.where) from None
    return Reply(router, s, turn, remembered, parse, opening)


def _structured(router: Router, req: ChatRequest) -> tuple[list[dict], dict, dict | None, bool]:
    """What tools and the answer format make of a chat (tools.py): the messages and apply_chat_template
    kwargs for the template, the grammar (a forced call wins over the answer format), and whether the
    answer may hold calls. Off the event loop: grammars compile."""
    template = getattr(getattr(router.frontend, "tokenizer", None), "chat_template", None)
    msgs, kw = tl.render(req.messages, req.tools, req.tool_choice, tl.template_supports_tools(template))
    n_chars = sum(len(m.get("content") or "") + len(json.dumps(m.get("tool_calls") or "")) for m in msgs)
    fields.check_chars(n_chars + len(json.dumps(kw)), router.context_limit, req.where)  # before the template runs
    grammar = (tl.tool_grammar(req.tools, req.tool_choice) if req.tools else None) or req.answer_format
    parse = bool(req.tools) and tl.check_tool_choice(req.tools, req.tool_choice) != "none"
    return msgs, kw, grammar, parse
