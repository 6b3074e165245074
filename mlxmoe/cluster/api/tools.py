"""OpenAI tools and response_format <-> the model's text (pure: no MLX).

The tool-call text format is the one mlx-lm's server parses for Qwen-style chat
templates (mlx_lm/tool_parsers/json_tools.py):

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Templates that render `tools` themselves (Qwen2.5/3: the template mentions `tools`)
get them as apply_chat_template's `tools=` argument, as mlx-lm's server passes them.
Templates that do not (the bundled reference model's) get a system message that
declares the functions and this format, and earlier tool calls and results as text.
Grammar specs (node/grammar.py) make the node produce exactly this format.
"""

from __future__ import annotations

import json
import uuid

from mlxmoe.errors import MlxMoeError

TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"  # = node/grammar.py's


# ------------------------------------------------------------ request side
def template_supports_tools(chat_template: str | None) -> bool:
    """Whether a chat template renders `tools` itself (as mlx-lm infers: it names them)."""
    return bool(chat_template) and "tools" in chat_template


def check_tool_choice(tools, tool_choice):
    """tool_choice normalised: "none" | "auto" | "required" | {"name": ...}; MlxMoeError naming the field."""
    if tools is not None and (not isinstance(tools, list) or not all(
            isinstance(t, dict) and isinstance(t.get("function"), dict) and isinstance(t["function"].get("name"), str)
            for t in tools)):
        raise MlxMoeError("tools: expected a list of {type: function, function: {name, parameters}}")
    if tool_choice is None:
        return "auto" if tools else "none"
    if tool_choice in ("none", "auto", "required"):
        if tool_choice == "required" and not tools:
            raise MlxMoeError("tool_choice: 'required' needs tools")
        return tool_choice
    if isinstance(tool_choice, dict) and isinstance((tool_choice.get("function") or {}).get("name"), str):
        name = tool_choice["function"]["name"]
        if name not in {t["function"]["name"] for t in tools or []}:
            raise MlxMoeError(f"tool_choice: function {name!r} is not among the declared tools")
        return {"name": name}
    raise MlxMoeError("tool_choice: expected 'none', 'auto', 'required' or {type: function, function: {name}}")


def tool_grammar(tools, tool_choice) -> dict | None:
    """The node's grammar spec (GenParams.grammar) for tools + tool_choice; None: free text
    ("auto" is parsed, not constrained; "none" offers no tools)."""
    choice = check_tool_choice(tools, tool_choice)
    if choice in ("none", "auto"):
        return None
    return {"type": "tool_call", "tools": tools, "choice": choice}


def response_format_grammar(response_format) -> dict | None:
    """The grammar spec of an OpenAI response_format (None or {"type": "text"}: free text)."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema") if isinstance(
            response_format.get("json_schema"), dict) else None
        if not isinstance(schema, dict):
            raise MlxMoeError("response_format.json_schema.schema: expected a JSON schema object")
        return {"type": "json_schema", "schema": schema}
    raise MlxMoeError("response_format.type: expected 'text', 'json_object' or 'json_schema'")


def tools_system_prompt(tools: list) -> str:
    """Declares the functions and the call format, for templates that do not render tools."""
    specs = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
    return ("You may call one or more functions to assist with the user query.\n"
            f"Available functions:\n{specs}\n"
            f"To call a function, answer with {TOOL_CALL_START}{{\"name\": <function name>, "
            f"\"arguments\": <arguments as a JSON object>}}{TOOL_CALL_END}.")


def _as_text(m: dict) -> dict:
    """An assistant tool-call turn or a tool result as plain text, for templates without tools."""
    if m.get("role") == "tool":
        return {"role": "user", "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"}
    calls = m.get("tool_calls") if m.get("role") == "assistant" else None
    if not calls:
        return m
    text = "".join(f"{TOOL_CALL_START}{json.dumps(_call_json(c), ensure_ascii=False)}{TOOL_CALL_END}" for c in calls)
    return {"role": "assistant", "content": (m.get("content") or "") + text}


def _call_json(call: dict) -> dict:
    fn = call.get("function") or {}
    args = fn.get("arguments")
    try:
        args = json.loads(args) if isinstance(args, str) else (args or {})
    except json.JSONDecodeError:
        pass  # keep the caller's text as it was sent
    return {"name": fn.get("name"), "arguments": args}


def _dict_args(m: dict) -> dict:
    """Earlier calls' arguments as objects, as mlx-lm's server hands them to templates (some apply tojson)."""
    if not m.get("tool_calls"):
        return m
    calls = [{**c, "function": {**c.get("function", {}), "arguments": _call_json(c)["arguments"]}}
             for c in m["tool_calls"]]
    return {**m, "tool_calls": calls}


def render(messages: list[dict], tools, tool_choice, template_tools: bool) -> tuple[list[dict], dict]:
    """(messages, extra apply_chat_template kwargs) for a request with tools.
    template_tools: the chat template renders tools (template_supports_tools)."""
    choice = check_tool_choice(tools, tool_choice)
    if template_tools:
        return [_dict_args(m) for m in messages], ({"tools": tools} if tools and choice != "none" else {})
    messages = [_as_text(m) for m in messages]
    if not tools or choice == "none":
        return messages, {}
    prompt = tools_system_prompt(tools)
    if messages and messages[0].get("role") == "system":
        return [{**messages[0], "content": f"{messages[0].get('content') or ''}\n\n{prompt}"}] + messages[1:], {}
    return [{"role": "system", "content": prompt}] + messages, {}


# ------------------------------------------------------------ response side
def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def to_openai(body: str, index: int, new_id=new_call_id, closed: bool = True) -> dict | None:
    """One tool call's text (between the tags) as an OpenAI tool_call; None when it is not
    a JSON {"name": str, "arguments": ...}. closed=False: the call was cut short (max_tokens):
    a call whose name is whole is still one, with the arguments text produced so far."""
    try:
        call = json.loads(body.strip())
    except json.JSONDecodeError:
        call = None if closed else _cut_call(body)
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    args = call.get("arguments", call.get("parameters", {}))
    return {"index": index, "id": new_id(), "type": "function",
            "function": {"name": call["name"],
                         "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)}}


def _cut_call(body: str) -> dict | None:
    """The start of a call object cut short, {"name": ..., "arguments": text so far}, read member by
    member; None unless its name is whole (the text is no call then)."""
    dec, text = json.JSONDecoder(), body.lstrip()
    if not text.startswith("{"):
        return None
    out, i = {}, 1
    while True:
        i = _skip(text, i, "")
        try:
            key, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            break
        i = _skip(text, i, ":")
        if i is None or not isinstance(key, str):
            break
        i = _skip(text, i, "")
        try:
            value, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:  # the member the cut fell in: its text so far
            if key in ("arguments", "parameters"):
                out.setdefault(key, text[i:])
            break
        out.setdefault(key, value)
        i = _skip(text, i, ",")
        if i is None:
            break
    if not isinstance(out.get("name"), str):
        return None
    out.setdefault("arguments", out.pop("parameters", ""))
    return out


def _skip(text: str, i: int, sep: str) -> int | None:
    """Past whitespace and, when sep is given, past sep and the whitespace after it (None: sep is not there)."""
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    if not sep:
        return i
    if not text.startswith(sep, i):
        return None
    return _skip(text, i + len(sep), "")


def _held(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag (held back while streaming)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ToolCallParser:
    """Incremental: feed text deltas, get events {"content": str} or {"tool_call": {index, id,
    type, function: {name, arguments}}} (each call whole, once its end tag arrives, as mlx-lm's
    server sends them); finish() flushes. Text that is not a valid call stays content."""

    def __init__(self, new_id=new_call_id):
        self.buf, self.in_call, self.calls, self.new_id = "", False, 0, new_id

    def feed(self, delta: str) -> list[dict]:
        self.buf += delta
        out = []
        while True:
            tag = TOOL_CALL_END if self.in_call else TOOL_CALL_START
            i = self.buf.find(tag)
            if i < 0:
                break
            body, self.buf = self.buf[:i], self.buf[i + len(tag):]
            if not self.in_call:
                out += self._content(body)
            else:
                out += self._call(body)
            self.in_call = not self.in_call
        if not self.in_call:
            keep = _held(self.buf, TOOL_CALL_START)
            out += self._content(self.buf[:len(self.buf) - keep])
            self.buf = self.buf[len(self.buf) - keep:]
        return out

    def finish(self) -> list[dict]:
        """The rest: held-back text, or an unterminated call (cut short by max_tokens: a call when
        its name is whole, with the arguments text so far; else content)."""
        rest, self.buf = self.buf, ""
        if self.in_call:
            self.in_call = False
            return self._call(rest, closed=False) if rest.strip() else self._content(TOOL_CALL_START + rest)
        return self._content(rest)

    def _content(self, text: str) -> list[dict]:
        return [{"content": text}] if text else []

    def _call(self, body: str, closed: bool = True) -> list[dict]:
        call = to_openai(body, self.calls, self.new_id, closed)
        if call is None:
            return self._content(TOOL_CALL_START + body + (TOOL_CALL_END if closed else ""))
        self.calls += 1
        return [{"tool_call": call}]


def parse_tool_calls(text: str, new_id=new_call_id) -> tuple[str, list[dict]]:
    """A whole answer: (content, OpenAI tool_calls without their streaming "index")."""
    p = ToolCallParser(new_id)
    events = p.feed(text) + p.finish()
    content = "".join(e.get("content", "") for e in events)
    calls = [{k: v for k, v in e["tool_call"].items() if k != "index"} for e in events if "tool_call" in e]
    return content, calls
