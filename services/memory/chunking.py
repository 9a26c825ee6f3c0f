"""Splitting documents longer than the embedding model's window into overlapping chunks.

all-MiniLM-L6-v2 was trained on inputs of up to 256 word pieces (sentence-transformers truncates there) and
llama.cpp refuses more than 512 tokens (`magi.infer.embed` answers 400 rather than truncating). English prose
runs at about 1.3 word pieces per word, identifiers and numbers (ports, serials, paths) at more, so a chunk is
at most CHUNK_WORDS words and CHUNK_CHARS characters: at ~4 characters per word piece even dense technical text
stays near 200 word pieces, well inside what the model saw in training. Shorter chunks also keep one topic each,
which is what a nearest-neighbour search over mean-pooled vectors rewards. Consecutive chunks share
OVERLAP_WORDS words so a sentence cut at a boundary is still whole in one of them.

Text that is denser still (a long run of punctuation-separated tokens) can exceed the model's limit anyway; the
service then halves that chunk with `halve` and embeds both halves (see services/memory/service.py).
"""

from __future__ import annotations

CHUNK_WORDS = 160
CHUNK_CHARS = 900
OVERLAP_WORDS = 32


def _windows(words: list[str], max_words: int, max_chars: int, overlap: int) -> list[list[str]]:
    chunks: list[list[str]] = []
    start = 0
    while start < len(words):
        end, chars = start, 0
        while end < len(words) and end - start < max_words:
            extra = len(words[end]) + (1 if end > start else 0)
            if end > start and chars + extra > max_chars:
                break
            chars += extra
            end += 1
        chunks.append(words[start:end])
        if end >= len(words):
            break
        # step back by the overlap, but always move forward by at least one word
        start = max(start + 1, end - overlap)
    return chunks


def _split_long_words(words: list[str], max_chars: int) -> list[str]:
    out: list[str] = []
    for word in words:
        while len(word) > max_chars:
            out.append(word[:max_chars])
            word = word[max_chars:]
        out.append(word)
    return out


def chunk_text(text: str, *, max_words: int = CHUNK_WORDS, max_chars: int = CHUNK_CHARS,
               overlap: int = OVERLAP_WORDS) -> list[str]:
    """The text itself when it fits one chunk (unchanged, whitespace included); otherwise overlapping word
    windows of at most `max_words` words and `max_chars` characters, joined by single spaces."""
    if overlap >= max_words:
        raise ValueError("overlap must be smaller than the chunk")
    words = text.split()
    if len(words) <= max_words and len(text) <= max_chars:
        return [text]
    words = _split_long_words(words, max_chars)
    return [" ".join(w) for w in _windows(words, max_words, max_chars, overlap)]


def halve(text: str) -> list[str]:
    """Two halves of a chunk the embedding model refused as too long (by words, or by characters for one word)."""
    words = text.split()
    if len(words) >= 2:
        mid = len(words) // 2
        return [" ".join(words[:mid]), " ".join(words[mid:])]
    mid = len(text) // 2
    return [text[:mid], text[mid:]]
