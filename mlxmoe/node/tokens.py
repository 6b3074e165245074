"""Tokenizer helpers shared by nodes and the router's trunk front end."""

from __future__ import annotations


class Tokens:
    tokenizer = None

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def encode_chat(self, messages: list[dict], **template_kwargs) -> list[int]:
        """template_kwargs go to the chat template (`tools=` for templates that render them;
        `add_generation_prompt=False, continue_final_message=True` to continue the last message)."""
        text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  **{"add_generation_prompt": True, **template_kwargs})
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)


def special_ids(tokenizer) -> set[int]:
    """The tokenizer's special tokens (added tokens marked special): never sent as text."""
    ids = set(getattr(tokenizer, "all_special_ids", None) or [])
    for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(t, "special", False):
            ids.add(int(i))
    return ids


def turn_end(tokenizer) -> int | None:
    """The special token the chat template puts right after an assistant
    message (ChatML's <|im_end|>, Llama 3's <|eot_id|>): a model ends its
    answer with it even when no eos_token_id names it. Harmony templates
    (<|channel|>) end inner messages with <|end|> mid-answer: their ends come
    from generation_config.json only."""
    try:
        a = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
                                          tokenize=False)
    except Exception:  # no template, or one that wants other messages: nothing to infer
        return None
    if not isinstance(a, str) or "<|channel|>" in a or "Yo" not in a:
        return None
    after = a[a.rindex("Yo") + 2:]
    ids = list(tokenizer.encode(after, add_special_tokens=False)) if after else []
    return ids[0] if ids and ids[0] in special_ids(tokenizer) else None


def end_ids(tokenizer) -> set[int]:
    """Every token that ends an answer: mlx-lm's eos_token_ids (the tokenizer's
    eos and the bundle's eos_token_id lists, model/load.py) and the template's turn end."""
    if tokenizer is None:
        return set()
    ids = set(getattr(tokenizer, "eos_token_ids", None) or [])
    t = turn_end(tokenizer)
    return ids | ({t} if t is not None else set())


def turn_start(tokenizer) -> int | None:
    """The special token that opens a turn in the chat template (ChatML's
    <|im_start|>): an answer never opens a new turn, so the node never samples
    it (small or masked models otherwise answer with a made-up next turn).
    None for harmony templates and templates without such a token."""
    try:
        g = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
        u = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=False, tokenize=False)
    except Exception:
        return None
    if not isinstance(g, str) or not isinstance(u, str) or "<|channel|>" in g or not g.startswith(u):
        return None
    ids = list(tokenizer.encode(g[len(u):], add_special_tokens=False))
    return ids[0] if ids and ids[0] in special_ids(tokenizer) else None
