"""Turning a token stream into text events: incremental detokenisation, stop
strings (text that might begin a stop string is held back until it cannot),
EOS and max_tokens.

A turn continued on another node (failover, migration: docs/ARCHITECTURE.md,
"Exact splice") resumes rather than restarts: the detokenizer is primed with
the turn's tokens so far and the characters already delivered are skipped, so
the text is what one node would have streamed (the leading space of the next
token, a held-back space or stop-string prefix, a partial UTF-8 character)."""

from __future__ import annotations

from typing import Iterable, Iterator

from mlxmoe.errors import MlxMoeError
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


def check_resume(prompt: list[int], resume: int, resume_chars: int) -> None:
    """The resume fields of GenParams against the prompt (before any work)."""
    if not isinstance(resume, int) or not 0 <= resume < len(prompt):
        raise MlxMoeError(f"params.resume: must be 0..{len(prompt) - 1} (turn tokens at the end of the prompt)")
    if not isinstance(resume_chars, int) or resume_chars < 0 or (resume == 0 and resume_chars):
        raise MlxMoeError("params.resume_chars: must be >= 0, and 0 unless params.resume > 0")


def text_events(steps: Iterable[tuple], detokenizer, eos: set, stops: list[str],
                max_tokens: int, resume: Iterable[int] = (), sent: int = 0,
                open_end: bool = False, special: set = frozenset()) -> Iterator[TokenEvent]:
    """steps: (token, logprob) or (token, logprob, top_logprobs) from the model.
    Yields one TokenEvent per token; the last one carries finish_reason ("stop"
    or "length"); an EOS token's own text is never sent, and `special` tokens
    (the tokenizer's special tokens that are not EOS) add no text.
    resume: the turn's tokens already streamed (by this or another node),
    of whose text `sent` characters were delivered. open_end: max_tokens ends
    this call, not the turn (a race's first tokens), so text held back at the
    last token stays held for the call that continues the turn."""
    stops = [s for s in stops if s]
    detokenizer.reset()
    for token in resume:
        if token in special:
            continue
        detokenizer.add_token(token)
        _ = detokenizer.text  # read after each token, as the first node did (the naive one flushes lines on reads)
    n = 0
    for step in steps:
        token, logprob, top = step[0], step[1], (step[2] if len(step) > 2 else None)
        n += 1
        if token in eos:
            detokenizer.finalize()
            yield TokenEvent(token, detokenizer.text[sent:], logprob, "stop", top)
            return
        if token not in special:
            detokenizer.add_token(token)
        text = detokenizer.text
        hit = min((i for i in (text.find(s, max(0, sent - max(map(len, stops), default=0))) for s in stops) if i >= 0), default=-1)
        if hit >= 0:
            yield TokenEvent(token, text[sent:hit], logprob, "stop", top)
            return
        if n >= max_tokens and not open_end:
            detokenizer.finalize()
            yield TokenEvent(token, detokenizer.text[sent:], logprob, "length", top)
            return
        safe = len(text) - _holdback(text, stops)
        yield TokenEvent(token, text[sent:safe], logprob, "length" if n >= max_tokens else None, top)
        if n >= max_tokens:
            return
        sent = max(sent, safe)
