"""VllmEngine against a real model on a CUDA GPU; MAGI_VLLM_MODEL names a local HF model folder."""

import os

import pytest

from services.inference.engine import GenerateParams
from services.inference.vllm_engine import VllmEngine


def _skip_reason() -> str | None:
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        return f"vLLM is not importable ({exc}); install the `gpu` extra on a CUDA node"
    import torch  # vllm depends on it

    if not torch.cuda.is_available():
        return "no CUDA GPU"
    if not os.environ.get("MAGI_VLLM_MODEL"):
        return "set MAGI_VLLM_MODEL to a local model folder"
    return None


_REASON = _skip_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]


@pytest.fixture(scope="module")
def engine():
    eng = VllmEngine(os.environ["MAGI_VLLM_MODEL"], n_ctx=1024, gpu_memory_utilization=0.5, enforce_eager=True)
    eng.load()
    try:
        yield eng
    finally:
        eng.close()


def _params() -> GenerateParams:
    messages = [{"role": "user", "content": "Name three colours of the rainbow."}]
    return GenerateParams(messages=messages, max_tokens=24, temperature=0.0, seed=0)


def test_greedy_generation_is_deterministic(engine):
    first = engine.generate(_params())
    second = engine.generate(_params())
    assert first.text.strip() and first.prompt_tokens > 0 and 0 < first.completion_tokens <= 24
    assert first.finish_reason in ("stop", "length")
    assert (second.text, second.completion_tokens) == (first.text, first.completion_tokens)


def test_stream_yields_the_same_text(engine):
    pieces, stream = [], engine.stream(_params())
    while True:
        try:
            pieces.append(next(stream))
        except StopIteration as end:
            done = end.value
            break
    reference = engine.generate(_params())
    assert "".join(pieces) == done.text == reference.text
    assert done.completion_tokens == reference.completion_tokens


def test_prefix_is_continued_not_repeated(engine):
    whole = engine.generate(_params())
    prefix = whole.text[: max(1, len(whole.text) // 2)]
    rest = engine.generate(_params(), prefix=prefix)
    # Greedy decoding that ignored the prefix would start the same answer over, word for word.
    assert rest.text and rest.text != whole.text
