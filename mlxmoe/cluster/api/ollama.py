"""The Ollama dialect (Ollama's docs/api.md): POST /api/chat, POST /api/generate (NDJSON streaming by default,
or one object), GET /api/tags, POST /api/show, GET /api/ps, GET /api/version. A body is parsed once into a
ChatRequest or PromptRequest (chat.py) as openai.py does; the reply is written back as Ollama's objects, each
answer's last one with Ollama's counts and durations; errors as {"error": message}.

Ollama's shapes are converted at the edge: tool-call arguments travel as objects (the neutral form holds JSON
text), and a tool result, which Ollama pairs with its call by order and `tool_name`, gets the id of that call.
Options map onto GenParams (OPTIONS); Ollama's load-time and llama.cpp-only options are checked for type and
ignored (IGNORED_*); images, suffix, template and context are refused (this runtime serves one text model with
its own chat template, and answers carry no context)."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime, timezone
from typing import Any, Callable

from aiohttp import web

from mlxmoe import __version__
from mlxmoe.cluster.api import chat, http, openai, sse
from mlxmoe.cluster.api import tools as tl
from mlxmoe.cluster.api.fields import (MAX_TOOLS, check_range, compile_grammar, flag, message_list, message_role,
                                       number, opt, stop_list, text)
from mlxmoe.cluster.api.openai import MAX_TOKENS_DEFAULT, Answer, noticed, piece
from mlxmoe.errors import ApiError, MlxMoeError, api_error
from mlxmoe.params import MAX_TOKENS_LIMIT, GenParams, check

ROLES = ("system", "user", "assistant", "tool")
MAX_STOP = 16
TAG = ":latest"  # Ollama names are name:tag; this router serves its one model as name:latest
NEVER = "9999-12-31T23:59:59Z"  # /api/ps expires_at: the cluster keeps its model loaded (Ollama shows "Forever")
# Ollama's options that GenParams has, under GenParams' names (num_predict is read by `num_predict`)
OPTIONS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p", "stop": "stop",
           "seed": "seed", "repeat_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
           "frequency_penalty": "frequency_penalty", "num_predict": "max_tokens"}
NAMES = {field: f"options.{name}" for name, field in OPTIONS.items()} | {"top_logprobs": "top_logprobs"}
# accepted (their types checked) and ignored: the node sizes its context, batches and threads itself; mlx-lm has
# no mirostat, tail-free or typical sampling; repeat_penalty looks back over mlx-lm's fixed window (20 tokens)
IGNORED_INT = ("num_ctx", "num_batch", "num_gpu", "main_gpu", "num_thread", "num_keep", "repeat_last_n", "mirostat")
IGNORED_NUM = ("tfs_z", "typical_p", "mirostat_tau", "mirostat_eta")
IGNORED_BOOL = ("numa", "low_vram", "f16_kv", "logits_all", "vocab_only", "use_mmap", "use_mlock", "embedding_only",
                "penalize_newline")
UNSUPPORTED = {"images": " (this model reads text only)", "suffix": " (no fill-in-the-middle)",
               "template": ": the model's own chat template is used (or send 'raw': true with a formatted prompt)",
               "context": ": send the conversation to /api/chat"}


def error_body(e: ApiError) -> dict:
    return {"error": e.message}


# ---------------------------------------------------------------- the request
def model_name(router, body: dict, field: str = "model") -> str:
    """The model a request names, as it names it: the router's model with or without ":latest" (404 else)."""
    name = body.get(field)
    if name is None or name == "":
        raise ApiError(400, f"'{field}' is required", field, "missing_required_parameter")
    if not isinstance(name, str):
        raise ApiError(400, f"'{field}' must be a string", field, "invalid_type")
    if name.removesuffix(TAG) not in router.model_names():
        raise ApiError(404, f"model {text(name, field)[:200]!r} not found", field, "model_not_found")
    return name


def chat_request(body: dict, headers) -> tuple[chat.ChatRequest | None, Answer]:
    """A /api/chat body, parsed once (grammars compile here: call it off the event loop); None: no messages,
    a model load."""
    tools, _ = openai.parse_tools({"tools": body.get("tools")})
    msgs, params, fmt, how = parse_messages(body), gen_params(body), answer_format(body), answer_of(body)
    req = chat.ChatRequest(msgs, params, tools, None, fmt, openai.routing(headers, body))
    return (req if msgs else None), how


def generate_request(body: dict, headers) -> tuple[chat.ChatRequest | chat.PromptRequest | None, Answer]:
    """A /api/generate body, parsed once (off the event loop): raw, the prompt as it is (`system` ignored, as
    Ollama does); else the chat template over `system` and the prompt. None: an empty prompt, a model load."""
    prompt = text(opt(body, "prompt", (str,), "a string", ""), "prompt")
    system = text(opt(body, "system", (str,), "a string", ""), "system")
    for name, kinds, what in (("images", (list,), "a list"), ("suffix", (str,), "a string"),
                              ("template", (str,), "a string"), ("context", (list,), "a list of token ids")):
        if opt(body, name, kinds, what):
            raise ApiError(400, f"'{name}' is not supported{UNSUPPORTED[name]}", name, "unsupported_value")
    params, fmt, rt, how = gen_params(body), answer_format(body), openai.routing(headers, body), answer_of(body)
    if not prompt:
        return None, how
    if flag(body, "raw"):
        return chat.PromptRequest(prompt, params.edit(grammar=fmt), rt), how
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return chat.ChatRequest(msgs, params, None, None, fmt, rt, "prompt"), how


def answer_of(body: dict) -> Answer:
    """How the answer is written: streamed unless "stream": false (Ollama's default), logprobs or not.
    keep_alive and think are accepted and ignored: the cluster keeps its model loaded; no separate thinking."""
    opt(body, "keep_alive", (int, float, str), "a duration (seconds, or a string like \"5m\")")
    opt(body, "think", (bool, str), "true, false or a level")
    return Answer(opt(body, "stream", (bool,), "true or false", True), flag(body, "logprobs"))


def gen_params(body: dict) -> GenParams:
    """`options` as GenParams; ranges are GenParams' own (params.check), named as Ollama names them."""
    o = opt(body, "options", (dict,), "an object", {})
    for name in IGNORED_INT:
        _int(o, name)
    for name in IGNORED_NUM:
        _num(o, name)
    for name in IGNORED_BOOL:
        opt(o, name, (bool,), "true or false", None, f"options.{name}")
    p = GenParams(max_tokens=num_predict(o), temperature=_num(o, "temperature"), top_p=_num(o, "top_p"),
                  top_k=_int(o, "top_k"), min_p=_num(o, "min_p"), stop=stop_list(o.get("stop"), "options.stop", MAX_STOP),
                  seed=seed(o), repetition_penalty=_num(o, "repeat_penalty"),
                  presence_penalty=_num(o, "presence_penalty", 0.0), frequency_penalty=_num(o, "frequency_penalty", 0.0),
                  top_logprobs=top_logprobs(body))
    check(p.to_dict(), "", NAMES)
    return p


def _num(o: dict, name: str, default: float | None = None) -> float | None:
    return number(o, name, default, f"options.{name}")


def _int(o: dict, name: str, default: int | None = None) -> int | None:
    return opt(o, name, (int,), "an integer", default, f"options.{name}")


def num_predict(o: dict) -> int:
    """max_tokens: -1 (Ollama's "until done") and -2 ("fill the context") get the default, as absence does:
    a node reserves memory for what a turn may generate."""
    n = _int(o, "num_predict", -1)
    if n in (-1, -2):
        return MAX_TOKENS_DEFAULT
    if not 1 <= n <= MAX_TOKENS_LIMIT:
        raise ApiError(400, f"'options.num_predict' must be -1, -2 or 1..{MAX_TOKENS_LIMIT}, got {n}"[:300],
                       "options.num_predict", "invalid_value")
    return n


def seed(o: dict) -> int | None:
    """-1 is Ollama's "random" (no seed)."""
    s = _int(o, "seed")
    return None if s == -1 else s


def top_logprobs(body: dict) -> int:
    n = opt(body, "top_logprobs", (int,), "an integer", 0)
    check_range("top_logprobs", n, 0, openai.TOP_LOGPROBS_LIMIT)
    return n if flag(body, "logprobs") else 0


def answer_format(body: dict) -> dict | None:
    """`format` as a grammar spec: "json" any JSON object, a JSON schema one that validates ("" or none: text)."""
    f = body.get("format")
    if f is None or f == "":
        return None
    if f == "json":
        return {"type": "json_object"}
    if not isinstance(f, dict):
        raise ApiError(400, "'format' must be \"json\" or a JSON schema object", "format", "invalid_value")
    spec = {"type": "json_schema", "schema": f}
    try:
        compile_grammar(spec, "format")
    except ApiError as e:  # grammar_spec names some refusals by OpenAI's field: say ours (see fields.compile_grammar)
        if e.param in (None, "format"):
            raise
        raise ApiError(e.status, e.message.replace(f"'{e.param}'", "'format'", 1), "format", e.code) from None
    return spec


def parse_messages(body: dict) -> list[dict]:
    """Ollama's messages in the neutral form; tool results paired with the calls they answer."""
    out, unanswered = [], []  # the calls of the latest assistant message that no tool result has answered yet
    for i, m in enumerate(message_list(body, required=False)):
        where = f"messages[{i}]"
        role = message_role(m, where, ROLES)
        if opt(m, "images", (list,), "a list", None, f"{where}.images"):
            raise ApiError(400, f"'{where}.images': images are not supported (this model reads text only)",
                           f"{where}.images", "unsupported_value")
        msg = {"role": role, "content": text(opt(m, "content", (str,), "a string", "", f"{where}.content"),
                                             f"{where}.content")}
        if role == "assistant":
            unanswered = tool_calls(m, where, i)
            msg.update({"tool_calls": list(unanswered)} if unanswered else {})
        elif role == "tool":
            name = opt(m, "tool_name", (str,), "a string", None, f"{where}.tool_name")
            msg["tool_call_id"] = answered(unanswered, name, f"call_{i}")
        out.append(msg)
    if out and not any(m["role"] == "user" for m in out):
        raise ApiError(400, "'messages' must contain at least one message with role 'user'", "messages",
                       "invalid_value")
    return out


def tool_calls(m: dict, where: str, i: int) -> list[dict]:
    """An assistant's calls in the neutral form: arguments objects as JSON text, ids made up (Ollama has none)."""
    calls = opt(m, "tool_calls", (list,), f"a list of up to {MAX_TOOLS} calls", [], f"{where}.tool_calls")
    if len(calls) > MAX_TOOLS:
        raise ApiError(400, f"'{where}.tool_calls' must be a list of up to {MAX_TOOLS} calls", f"{where}.tool_calls",
                       "invalid_value")
    out = []
    for j, c in enumerate(calls):
        w = f"{where}.tool_calls[{j}].function"
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ApiError(400, f"'{w}.name' must be a non-empty string", f"{w}.name", "invalid_value")
        args = opt(fn, "arguments", (dict,), "an object", {}, f"{w}.arguments")
        out.append({"id": f"call_{i}_{j}", "type": "function",
                    "function": {"name": text(fn["name"], f"{w}.name"), "arguments": json_text(args, f"{w}.arguments")}})
    return out


def json_text(v: Any, where: str) -> str:
    try:
        return text(json.dumps(v, ensure_ascii=False, allow_nan=False), where)
    except (ValueError, RecursionError):
        raise ApiError(400, f"'{where}' must be a JSON object of finite numbers, not nested too deep", where,
                       "invalid_value") from None


def answered(unanswered: list[dict], name: str | None, fresh: str) -> str:
    """The id of the call a tool result answers: the first unanswered call of its `tool_name` (any, when it has
    none); `fresh` when there is none (a result without its call still reaches the template)."""
    for c in unanswered:
        if name is None or c["function"]["name"] == name:
            unanswered.remove(c)
            return c["id"]
    return fresh


# ---------------------------------------------------------------- handlers: parse -> start -> respond
async def chat_handler(request: web.Request) -> web.StreamResponse:
    t0 = time.time()
    router, owner, body = await http.body_of(request)
    name = model_name(router, body)
    req, how = await asyncio.to_thread(chat_request, body, request.headers)  # grammars compile off the loop
    return await respond(request, router, owner, req, how, name, t0, message)


async def generate_handler(request: web.Request) -> web.StreamResponse:
    t0 = time.time()
    router, owner, body = await http.body_of(request)
    name = model_name(router, body)
    req, how = await asyncio.to_thread(generate_request, body, request.headers)
    return await respond(request, router, owner, req, how, name, t0, response)


def message(content: str, calls: list[dict] | None = None) -> dict:
    """/api/chat's answer piece."""
    return {"message": {"role": "assistant", "content": content, **({"tool_calls": calls} if calls else {})}}


def response(content: str, calls: list[dict] | None = None) -> dict:
    """/api/generate's answer piece (no tools there)."""
    return {"response": content}


async def respond(request: web.Request, router, owner: str, req, how: Answer, name: str, t0: float,
                  shape: Callable[..., dict]) -> web.StreamResponse:
    """Start the turn and write its answer (a request with nothing to say is a model load: Ollama answers
    done_reason "load" at once)."""
    if req is None:
        return web.json_response({**head(name), **shape(""), "done": True, "done_reason": "load"})
    reply = await chat.start(router, owner, req)
    request[http.TURN] = reply.turn
    try:
        if how.stream:
            return await stream(request, reply, how, name, t0, shape)
        try:
            content, calls, frames = await reply.collect()
        except MlxMoeError as e:  # a node failed, or none is left to continue on
            raise api_error(e) from None
        content, calls = ollama_calls(content, calls)
        out = {**head(name), **shape(content, calls), **done(reply, t0)}
        if how.logprobs:
            out["logprobs"] = [logprob(f) for f in frames]
        return web.json_response(noticed(out, reply), headers=reply.headers)
    finally:
        await reply.close()


async def stream(request: web.Request, reply: chat.Reply, how: Answer, name: str, t0: float,
                 shape: Callable[..., dict]) -> web.StreamResponse:
    """NDJSON: a line per piece, then the done line with the counts; a failure mid-answer is a last
    {"error": ...} line (the status is sent already)."""
    resp = await sse.open_stream(request, reply.headers, "application/x-ndjson")
    try:
        async for p in reply.parts():
            lp = {"logprobs": [logprob(p.frame)]} if how.logprobs and p.frame is not None else {}
            content, calls = ollama_calls(p.text, [p.call] if p.call is not None else [])
            if content or calls or lp:
                await sse.send_line(resp, {**head(name), **shape(content, calls), "done": False, **lp})
    except MlxMoeError as e:  # a node failed, or none is left to continue on
        await sse.send_line(resp, error_body(api_error(e)))
        return resp
    await sse.send_line(resp, noticed({**head(name), **shape(""), **done(reply, t0)}, reply))
    return resp


async def tags(request: web.Request) -> web.Response:
    http.client_of(request)
    return web.json_response({"models": [entry(request.app[http.ROUTER_KEY])]})


async def ps(request: web.Request) -> web.Response:
    """The model as loaded: while a node serves it (it never unloads on its own)."""
    http.client_of(request)
    router = request.app[http.ROUTER_KEY]
    e, ctx = entry(router), router.context_limit
    loaded = {**e, "expires_at": NEVER, **({"size_vram": e["size"]} if "size" in e else {}),  # unified memory
              **({"context_length": ctx} if ctx else {})}
    return web.json_response({"models": [loaded] if router.peers.live() else []})


async def show(request: web.Request) -> web.Response:
    router, _, body = await http.body_of(request)
    model_name(router, body, "name" if "model" not in body and "name" in body else "model")  # "name": older clients
    e, template = entry(router), getattr(getattr(router.frontend, "tokenizer", None), "chat_template", None)
    return web.json_response({"details": e["details"], "model_info": model_info(router),
                              "capabilities": ["completion", "tools"], "parameters": parameters(router),
                              **({"template": template} if isinstance(template, str) else {}),
                              **({"modified_at": e["modified_at"]} if "modified_at" in e else {})})


async def version(request: web.Request) -> web.Response:
    http.client_of(request)
    return web.json_response({"version": __version__})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/chat", chat_handler)
    app.router.add_post("/api/generate", generate_handler)
    app.router.add_get("/api/tags", tags)
    app.router.add_post("/api/show", show)
    app.router.add_get("/api/ps", ps)
    app.router.add_get("/api/version", version)


# ---------------------------------------------------------------- response shapes
def head(name: str) -> dict:
    """Every answer object starts so; `model` as the request named it (Ollama echoes it)."""
    return {"model": name, "created_at": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")}


def done(reply: chat.Reply, t0: float) -> dict:
    """The last object's fields: why it ended, the token counts and durations (ns) from the turn's times:
    load (the request until its turn opened: parsing, template, placement), prompt eval (the turn's start until
    its first token: connection and prefill), eval (first token to the end)."""
    t = reply.turn
    end = t.ended_at or time.time()
    first = t.first_at or end
    n_prompt, n_gen = reply.usage
    return {"done": True, "done_reason": "length" if reply.finish_reason == "length" else "stop",
            "total_duration": ns(end - t0), "load_duration": ns(t.started - t0), "prompt_eval_count": n_prompt,
            "prompt_eval_duration": ns(first - t.started), "eval_count": n_gen, "eval_duration": ns(end - first)}


def ns(seconds: float) -> int:
    return max(0, int(seconds * 1e9))


def ollama_calls(content: str, calls: list[dict]) -> tuple[str, list[dict]]:
    """Neutral calls in Ollama's shape, arguments as objects. A call cut short (num_predict) has no whole
    arguments object: it stays text, as Ollama gives back what it cannot parse as a call."""
    out = []
    for c in calls:
        fn = c["function"]
        try:
            args = json.loads(fn["arguments"])
        except json.JSONDecodeError:
            args = None
        if isinstance(args, dict):
            out.append({"function": {"name": fn["name"], "arguments": args}})
        else:
            content += f'{tl.TOOL_CALL_START}{{"name": {json.dumps(fn["name"])}, "arguments": {fn["arguments"]}'
    return content, out


def logprob(f: dict) -> dict:
    """A token frame in Ollama's logprobs shape."""
    return {"token": piece(f), "logprob": f["logprob"],
            "top_logprobs": [{"token": t["text"], "logprob": t["logprob"]} for t in f.get("top") or []]}


def entry(router) -> dict:
    """The model as /api/tags lists it, from its manifest; what the manifest does not say is left empty."""
    man = getattr(router.frontend, "manifest", None)
    files = getattr(man, "files", None) or {}
    created = getattr(man, "created", "")
    return {"name": router.model + TAG, "model": router.model + TAG, "digest": router.manifest_hash,
            **({"modified_at": created} if created else {}),
            **({"size": sum(f.get("size", 0) for f in files.values())} if files else {}),
            "details": details(man)}


def details(man) -> dict:
    family = (getattr(man, "model", None) or {}).get("model_type") or ""
    return {"parent_model": "", "format": "mlxmoe", "family": family, "families": [family] if family else None,
            "parameter_size": "", "quantization_level": quantization(getattr(man, "quantization", None))}


def quantization(q: dict | None) -> str:
    """"Q8" (trunk and experts alike), "Q4/Q8" (trunk/experts), "" when not quantized or not known."""
    bits = [((q or {}).get(part) or {}).get("bits") for part in ("trunk", "experts")]
    if not any(bits):
        return ""
    return "/".join(dict.fromkeys(f"Q{b}" if b else "unquantized" for b in bits))


# model_info keys (Ollama's GGUF-style names, under the architecture) -> config.json keys
CONFIG_INFO = {"embedding_length": "hidden_size", "block_count": "num_hidden_layers",
               "attention.head_count": "num_attention_heads", "attention.head_count_kv": "num_key_value_heads",
               "vocab_size": "vocab_size"}


def model_info(router) -> dict:
    man = getattr(router.frontend, "manifest", None)
    model, moe = getattr(man, "model", None) or {}, getattr(man, "moe", None) or {}
    arch, cfg = model.get("model_type") or "", model.get("config") or {}
    info = {"general.architecture": arch, "mlxmoe.groups": router.n_groups, "mlxmoe.manifest_hash": router.manifest_hash}
    if arch:
        known = {k: cfg.get(c) for k, c in CONFIG_INFO.items()} | {
            "context_length": router.context_limit, "expert_count": moe.get("n_experts"),
            "expert_used_count": moe.get("top_k")}
        info |= {f"{arch}.{k}": v for k, v in known.items() if v is not None}
    return info


def parameters(router) -> str:
    """The defaults a request gets, as Ollama's Modelfile parameters."""
    d = {**router.sampling_defaults, "max_tokens": MAX_TOKENS_DEFAULT}
    return "\n".join(f"{name:<20}{d[field]}" for name, field in OPTIONS.items() if d.get(field) is not None)
