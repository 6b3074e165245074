"""Tokenizer helpers shared by nodes and the router's trunk front end."""

from __future__ import annotations


class Tokens:
    tokenizer = None

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def encode_chat(self, messages: list[dict], **template_kwargs) -> list[int]:
        """template_kwargs go to the chat template (`tools=` for templates that render them)."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                                  **template_kwargs)
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)
