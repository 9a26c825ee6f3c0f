"""Refusing what cannot fit a model's context window before it reaches a replica.

Tokens are counted in the service process with the model's vocabulary alone (llama.cpp's
`vocab_only`: about 0.1 s and a few MB to load, no weights, no KV cache). That is cheaper than
asking a replica (which would take a replica slot, or fail while every replica restarts) and it is
exact: a generation prompt is counted by running llama-cpp-python's own `create_chat_completion` on
the vocabulary-only model up to the point where it hands the rendered prompt's tokens to
`create_completion`, so the chat template, BOS handling and special tokens are the replica's. An
embedding text is tokenized the way `Llama.embed` does it.

Limits mirror llama-cpp-python's: a prompt of n_ctx tokens or more is refused by it (here: 400 on
`prompt`); prompt + max_tokens over n_ctx would be cut short silently (here: 400 on `max_tokens`); an
embedding text longer than the batch (min(n_ctx, EMBED_BATCH)) would be truncated silently (here: 400
on `texts`). vLLM models (a model folder, not a .gguf) are not checked here.

Most requests are far from the limit, and rendering the template and tokenizing cost ~0.3 ms plus a hop to a
worker thread on every request's path (the clones of a mission wait for each other's turn at the one
vocabulary). So an upper bound comes first, on the caller's thread: the template's tokens measured once per
role with empty contents, plus each content's UTF-8 bytes (a token is at least one byte). Only a request that
bound cannot clear is rendered and counted exactly.
"""

from __future__ import annotations

import threading
from pathlib import Path

from services.inference.catalog import ModelSpec
from services.inference.engine import EMBED_BATCH
from shared.errors import BadRequest


ROLES = ("system", "user", "assistant")
BOUNDARY_SLACK = 2  # tokens per message for merges where a content meets the template text around it
QUICK_BYTES = 16384  # embedding texts this short are tokenized on the caller's thread (microseconds)


class _Counted(Exception):
    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.n = n


def _counting_llama(model_path: str):
    import llama_cpp

    class CountingLlama(llama_cpp.Llama):
        def create_completion(self, prompt, *args, **kwargs):
            raise _Counted(len(prompt) if isinstance(prompt, list) else len(self.tokenize(prompt.encode())))

    # n_ctx only sizes buffers a vocabulary-only model never fills; keep them small.
    return CountingLlama(model_path=model_path, vocab_only=True, n_ctx=128, n_batch=128, verbose=False)


class ContextWindow:
    def __init__(self, spec: ModelSpec, model_path: str) -> None:
        self.n_ctx = spec.n_ctx
        self.embedding = spec.embedding
        self.embed_limit = min(spec.n_ctx, EMBED_BATCH)
        self._llm = _counting_llama(model_path)
        self._lock = threading.Lock()  # one Llama object; callers come from several worker threads
        self._template = None if self.embedding else self._template_tokens()

    @classmethod
    def open(cls, spec: ModelSpec, model_path: str) -> "ContextWindow | None":
        """Blocking (loads the vocabulary): call it from a worker thread."""
        if spec.backend != "llama_cpp" or not Path(model_path).is_file():
            return None
        return cls(spec, model_path)

    def _template_tokens(self) -> tuple[int, dict[str, int]] | None:
        """The tokens of a one-message conversation with empty content, and what each further message adds
        (empty content) by role; None for a template that refuses some order of roles (then always exact)."""
        try:
            first = [{"role": "user", "content": ""}]
            base = self.prompt_tokens(first)
            return base, {role: max(0, self.prompt_tokens([*first, {"role": role, "content": ""}]) - base)
                          for role in ROLES}
        except Exception:
            return None

    def surely_fits(self, messages: list[dict[str, str]], max_tokens: int) -> bool:
        """True when an upper bound on the prompt's tokens shows that prompt and answer fit (no rendering, no
        tokenizing: cheap enough for the event loop); False means "count exactly", not "too long"."""
        if self._template is None:
            return False
        base, per_role = self._template
        bound = base
        for message in messages:
            added = per_role.get(message["role"])
            if added is None:
                return False
            bound += added + len(message["content"].encode("utf-8")) + BOUNDARY_SLACK
        return bound + max(max_tokens, 1) <= self.n_ctx

    def prompt_tokens(self, messages: list[dict[str, str]]) -> int:
        with self._lock:
            try:
                self._llm.create_chat_completion(messages=messages, max_tokens=1)
            except _Counted as counted:
                return counted.n
        raise RuntimeError("the chat handler never reached create_completion")

    def check_generate(self, messages: list[dict[str, str]], max_tokens: int) -> int:
        """The prompt's token count, or BadRequest when the request cannot fit (blocking: tokenizes)."""
        used = self.prompt_tokens(messages)
        if used >= self.n_ctx:
            raise BadRequest(f"the prompt is {used} tokens; this model's context window is {self.n_ctx} "
                             f"(prompt and answer must fit in it)", field="prompt")
        if used + max_tokens > self.n_ctx:
            raise BadRequest(f"prompt ({used} tokens) + max_tokens ({max_tokens}) exceeds this model's context "
                             f"window of {self.n_ctx}; ask for at most {self.n_ctx - used}", field="max_tokens")
        return used

    def check_embed_quickly(self, texts: list[str]) -> int | None:
        """`check_embed` on the caller's thread for short texts while no worker thread holds the vocabulary
        (never waits for it); None otherwise: then call `check_embed` from a worker thread."""
        if sum(len(t) for t in texts) * 4 > QUICK_BYTES or not self._lock.acquire(blocking=False):
            return None
        try:
            counts = self._embed_counts(texts)
        finally:
            self._lock.release()
        return self._embed_verdict(counts)

    def check_embed(self, texts: list[str]) -> int:
        """BadRequest naming the first text too long to embed whole; else the texts' tokens in all
        (blocking: tokenizes)."""
        with self._lock:
            counts = self._embed_counts(texts)
        return self._embed_verdict(counts)

    def _embed_counts(self, texts: list[str]) -> list[int]:
        return [len(self._llm.tokenize(text.encode("utf-8"))) for text in texts]

    def _embed_verdict(self, counts: list[int]) -> int:
        for i, n in enumerate(counts):
            if n > self.embed_limit:
                raise BadRequest(f"texts[{i}] is {n} tokens; this embedding model takes at most {self.embed_limit}",
                                 field="texts")
        return sum(counts)
