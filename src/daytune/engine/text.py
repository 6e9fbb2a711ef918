"""Token ids to text as they arrive, and stop sequences: one detokenizer and one cutter for evaluation and the
server.

The detokenizer decodes a short window (the tokens of the last emitted piece plus the new ones: the
prefix/read offsets of vLLM's and TGI's incremental detokenizers), so each token costs a bounded decode instead of
a decode of everything so far. The window keeps one piece of left context, which SentencePiece needs to keep a
word's leading space. A character whose bytes are split over several tokens decodes to U+FFFD until its last
byte arrives: the tokens before then get "" and the completing one gets the character.
"""

from __future__ import annotations


class TextStream:
    """Incremental detokenizer: each pushed token gets the text it adds, so the pieces join to the decoded string.
    `context` (tokens before the first pushed one) is decoded but not emitted."""

    def __init__(self, tokenizer, context: list[int] = (), skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(context)
        self.prefix = 0  # decode from here, so that the tokenizer sees the left context
        self.read = len(self.ids)  # tokens before this already have their text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids, skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def push(self, tok: int) -> str:
        self.ids.append(tok)
        before = self._decode(self.ids[self.prefix : self.read])
        now = self._decode(self.ids[self.prefix :])
        if now.endswith("\ufffd") or not now.startswith(before):
            return ""  # an incomplete character: wait for the tokens that complete it
        self.prefix, self.read = self.read, len(self.ids)
        return now[len(before) :]

    def pending(self) -> str:
        """What the tokens without text yet decode to now (an incomplete character as U+FFFD)."""
        if self.read == len(self.ids):
            return ""
        before = self._decode(self.ids[self.prefix : self.read])
        now = self._decode(self.ids[self.prefix :])
        return now[len(before) :] if now.startswith(before) else now

    def flush(self) -> str:
        """Text still pending at the end, which then counts as emitted."""
        if self.read == len(self.ids):
            return ""
        rest = self.pending()
        self.prefix = self.read = len(self.ids)
        return rest


def token_texts(tokenizer, ids: list[int], context: list[int] = ()) -> list[str]:
    """Per-token text such that the pieces join to the decoded string (an incomplete character at the end goes
    to the last token)."""
    stream = TextStream(tokenizer, context)
    texts = [stream.push(t) for t in ids]
    if texts:
        texts[-1] += stream.flush()
    return texts


def cut_at_stop(text: str, stops: list[str]) -> int | None:
    """Where the earliest stop sequence starts in `text`, or None."""
    cuts = [text.find(s) for s in stops if s and s in text]
    return min(cuts) if cuts else None


def cut_pieces(pieces: list[str], stops: list[str]) -> tuple[list[str], bool]:
    """The token pieces kept when the text ends right before the earliest stop sequence, and whether it was cut:
    the tokens that start before the cut, the one crossing it keeping its part before it (so the kept pieces
    join to the cut text)."""
    cut = cut_at_stop("".join(pieces), stops)
    if cut is None:
        return pieces, False
    kept, used = [], 0
    for p in pieces:
        if used >= cut:
            break  # this token starts at or after the stop sequence
        kept.append(p[: cut - used])
        used += len(kept[-1])
    return kept, True


class StopWatcher:
    """Follows one sequence's text as tokens arrive and says when a stop sequence has appeared.

    The server watches the emitted text only; evaluation (`see_pending`) also watches what the tokens without
    text yet decode to, so its text is always the decode of every token so far. It takes no lock: a tokenizer
    shared by threads is the caller's to make safe (the server gives each thread its own copy)."""

    def __init__(self, stream: TextStream, stops: list[str], see_pending: bool = False):
        self.stream = stream
        self.stops = [s for s in stops if s]
        self.longest = max((len(s) for s in self.stops), default=0)
        self.see_pending = see_pending
        self.texts: list[str] = []
        self.text = ""

    def __call__(self, tok: int) -> bool:
        piece = self.stream.push(tok)
        pending = self.stream.pending() if self.see_pending and self.stops else ""
        start = max(0, len(self.text) - self.longest + 1)  # a new stop ends after the text seen before
        self.texts.append(piece)
        self.text += piece
        if not self.stops or not (piece or pending):
            return False
        tail = self.text[start:] + pending
        return any(s in tail for s in self.stops)

    def finish(self) -> list[str]:
        """The per-token texts, with what is still pending on the last token."""
        rest = self.stream.flush()
        if rest and self.texts:
            self.texts[-1] += rest
        return self.texts
