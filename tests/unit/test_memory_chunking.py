import pytest

from services.memory.chunking import CHUNK_CHARS, CHUNK_WORDS, OVERLAP_WORDS, chunk_text, halve

pytestmark = pytest.mark.unit


def test_a_short_text_is_one_chunk_unchanged():
    text = "  Melchior has\n two RTX 3090 cards.  "
    assert chunk_text(text) == [text]


def test_long_text_is_split_into_bounded_overlapping_windows():
    words = [f"word{i}" for i in range(1000)]
    chunks = chunk_text(" ".join(words))
    assert len(chunks) > 1
    assert all(len(c.split()) <= CHUNK_WORDS and len(c) <= CHUNK_CHARS for c in chunks)
    # every word is in some chunk, in order, and consecutive chunks share exactly OVERLAP_WORDS words
    covered = [w for c in chunks for w in c.split()]
    assert set(covered) == set(words)
    for a, b in zip(chunks, chunks[1:]):
        assert a.split()[-OVERLAP_WORDS:] == b.split()[:OVERLAP_WORDS]
    assert chunks[0].split()[0] == "word0" and chunks[-1].split()[-1] == "word999"


def test_the_character_cap_holds_for_long_words():
    text = " ".join(["x" * 50] * 100)  # 100 words of 50 characters: words fit, characters do not
    chunks = chunk_text(text)
    assert len(chunks) > 1 and all(len(c) <= CHUNK_CHARS for c in chunks)


def test_a_single_word_longer_than_a_chunk_is_cut():
    text = "a" * (CHUNK_CHARS * 3 + 5)
    chunks = chunk_text(text)
    assert "".join(chunks) == text and all(len(c) <= CHUNK_CHARS for c in chunks)


def test_every_chunk_makes_progress_even_with_large_overlap():
    chunks = chunk_text(" ".join(str(i) for i in range(50)), max_words=5, max_chars=1000, overlap=4)
    assert len(chunks) == 46 and chunks[-1] == "45 46 47 48 49"
    with pytest.raises(ValueError):
        chunk_text("a b c", max_words=3, overlap=3)


def test_halve_splits_by_words_or_characters():
    assert halve("a b c d") == ["a b", "c d"]
    assert halve("abcdef") == ["abc", "def"]
