"""Turning a token stream into text events: incremental detokenisation, stop
strings (text that might begin a stop string is held back until it cannot),
EOS and max_tokens."""

from __future__ import annotations

from typing import Iterable, Iterator

from mlxmoe.node.contract import TokenEvent


def _holdback(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class NullDetokenizer:
    """For token-id-only use (benchmarks on tokenizer-less synthetic models)."""

    text = ""

    def reset(self):
        pass

    def add_token(self, token):
        pass

    def finalize(self):
        pass


def text_events(steps: Iterable[tuple[int, float]], detokenizer, eos: set, stops: list[str],
                max_tokens: int) -> Iterator[TokenEvent]:
    """steps: (token, logprob) pairs from the model. Yields one TokenEvent per
    token; the last one carries finish_reason ("stop" or "length")."""
    stops = [s for s in stops if s]
    detokenizer.reset()
    sent = 0
    n = 0
    for token, logprob in steps:
        n += 1
        if token in eos:
            detokenizer.finalize()
            yield TokenEvent(token, detokenizer.text[sent:], logprob, "stop")
            return
        detokenizer.add_token(token)
        text = detokenizer.text
        hit = min((i for i in (text.find(s, max(0, sent - max(map(len, stops), default=0))) for s in stops) if i >= 0), default=-1)
        if hit >= 0:
            yield TokenEvent(token, text[sent:hit], logprob, "stop")
            return
        if n >= max_tokens:
            detokenizer.finalize()
            yield TokenEvent(token, detokenizer.text[sent:], logprob, "length")
            return
        safe = len(text) - _holdback(text, stops)
        yield TokenEvent(token, text[sent:safe], logprob)
        sent = max(sent, safe)
