"""Batched decoding for llama.cpp: one context serves up to `max_batch` sequences at once.

A replica with `max_batch > 1` in the catalogue runs this instead of `LlamaCppEngine`. One llama.cpp
context with `n_seq_max = max_batch` holds every sequence; a decode thread runs steps: requests join and
leave between steps (continuous batching), and each step decodes the next token of every active sequence
in one `llama_decode`, which costs little more than one token of one sequence on a CPU (the weights are
read once per step, not once per sequence).

Prompts that share a prefix share its KV: a newcomer's longest common prefix with a sequence already in
the cache is copied (`llama_memory_seq_cp`), not decoded again. A finished sequence's cells stay in its
slot until the slot is needed (as llama-server keeps a slot's prompt), so the next request that starts the
same way (the chat template's system prompt, a mission's context) finds them there, as a lone request on
the plain engine finds its predecessor's prompt in `Llama`'s cache. Newcomers of the same step that share a
prefix with each other are admitted in waves: the first decodes it, the others copy it right after. A
mission's clones arrive together with the same context block, so that block is decoded once for all.

KV layout (`kv_unified`): by default each sequence has a buffer of its own (a copy between buffers copies
the cells), so attention runs over exactly the cells a lone request would have and a request's answer
does not depend on its companions. Unified, all sequences share one buffer (a copy only tags cells with
another sequence id): faster here, but greedy answers then vary with the batch (README has both figures).

What a request sees matches `LlamaCppEngine`: the prompt is rendered by llama-cpp-python's own chat
handler (same template, BOS and stop strings), the sampler chain is the one `Llama` builds, and stop
strings, max_tokens, end-of-generation and streamed pieces follow `Llama._create_completion`.
"""

from __future__ import annotations

import ctypes
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generator

from services.inference.engine import Engine, GenerateParams, Generation, gpu_offload

log = logging.getLogger("magi.inference.batched")

N_BATCH = 512  # tokens per llama_decode: llama-cpp-python's default, so prompts split as they do unbatched
PENALTY_LAST_N = 64  # Llama's last_n_tokens_size
EARLY_ABORTS = 256  # aborts remembered for requests not seen yet
TOP_K, MIN_P, TYPICAL_P = 40, 0.05, 1.0  # create_chat_completion's defaults for what GenerateParams omits


class _Rendered(Exception):
    """Raised where llama-cpp-python's chat handler hands the rendered prompt to `create_completion`."""

    def __init__(self, tokens: list[int], stop: list[str]) -> None:
        super().__init__(len(tokens))
        self.tokens, self.stop = tokens, stop


def _template_llama(model_path: str, threads: int, offload: dict):
    """The model with llama-cpp-python's chat handling; its own context is tiny and never decodes. The
    model's layers go where `offload` (engine.gpu_offload) says; the batch's context then runs there too."""
    import llama_cpp

    class TemplateLlama(llama_cpp.Llama):
        def create_completion(self, prompt, *args, **kwargs):
            stop = kwargs.get("stop") or []
            raise _Rendered(list(prompt), [stop] if isinstance(stop, str) else list(stop))

    return TemplateLlama(model_path=model_path, n_ctx=64, n_batch=8, n_ubatch=8, n_threads=threads,
                         n_threads_batch=threads, verbose=False, **offload)


@dataclass(eq=False)
class _Seq:
    """One request's sequence: what it asked for, what is in the cache, what it has produced."""

    request_id: str
    params: GenerateParams
    prompt: list[int]  # rendered chat prompt (+ the tokens of a continued answer's start)
    prompt_tokens: int  # what usage reports: the rendered prompt alone
    stops: list[bytes]
    max_tokens: int
    stream: bool
    deadline: float | None
    started: float = field(default_factory=time.perf_counter)
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    aborted: bool = False
    slot: int = -1
    chain: Any = None
    cached: list[int] = field(default_factory=list)  # tokens whose KV the cache holds for this slot
    completion: list[int] = field(default_factory=list)
    text: bytes = b""
    sent: int = 0  # bytes of `text` handed out as pieces
    multibyte_fix: int = 0
    pending: int = -1  # sampled token not decoded yet


class BatchedLlama:
    """The decode loop. `submit` and `abort` are thread-safe; everything llama.cpp runs on the loop's thread."""

    def __init__(self, model_path: Path | str, *, n_ctx: int, threads: int, max_batch: int,
                 unified: bool = False, offload: dict | None = None) -> None:
        self.model_path = str(model_path)
        self.offload = dict(offload or {})  # llama_cpp.Llama's GPU keywords (engine.gpu_offload)
        self.unified = unified
        self.n_ctx = n_ctx  # per sequence, as for the unbatched engine
        self.threads = threads
        self.max_batch = max_batch
        self.stats = {"prompt_decoded": 0, "prompt_shared": 0, "steps": 0, "generated": 0, "admitted": 0}
        self._cv = threading.Condition()
        self._waiting: list[_Seq] = []
        self._active: dict[int, _Seq] = {}  # slot -> sequence
        # Free slots whose cells still hold a finished sequence's tokens, least recently finished first.
        self._idle: dict[int, list[int]] = {}
        self._by_id: dict[str, _Seq] = {}
        self._closing = False
        # Aborts that arrived before their request (the control call overtook it): honoured on submit.
        self._early_aborts: dict[str, None] = {}
        self._render_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # ---- lifecycle -----------------------------------------------------------------------------------

    def load(self) -> None:
        import llama_cpp
        from llama_cpp import _internals

        self._llm = _template_llama(self.model_path, self.threads, self.offload)
        params = llama_cpp.llama_context_default_params()
        # Room for every sequence's full window (split: n_ctx cells per sequence's buffer): the service
        # refuses prompt + max_tokens over n_ctx, so a step can never run out of cells.
        params.n_ctx = self.n_ctx * self.max_batch
        params.n_batch = params.n_ubatch = N_BATCH
        params.n_seq_max = self.max_batch
        params.kv_unified = self.unified
        params.n_threads = params.n_threads_batch = self.threads
        params.no_perf = True
        # Off, as llama-cpp-python's Llama sets it (the default, auto, turns it on for the CPU): the two
        # attention kernels round differently, and a small model at temperature 0 then answers otherwise.
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self._ctx = _internals.LlamaContext(model=self._llm._model, params=params, verbose=False)
        self._mem = llama_cpp.llama_get_memory(self._ctx.ctx)
        self._vocab = self._llm._model.vocab
        self._bos = self._llm.token_bos()
        self._piece_buf = (ctypes.c_char * 64)()
        self._batch = llama_cpp.llama_batch_init(N_BATCH, 0, 1)
        self._thread = threading.Thread(target=self._run, name="llama-batch", daemon=True)
        self._thread.start()

    def close(self) -> None:
        import llama_cpp

        with self._cv:
            self._closing = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            llama_cpp.llama_batch_free(self._batch)
            self._ctx.close()
            self._llm.close()

    # ---- the caller's side ---------------------------------------------------------------------------

    def submit(self, params: GenerateParams, *, request_id: str, prefix: str = "", stream: bool = False,
               deadline: float | None = None) -> _Seq:
        """Queue a request; its pieces and final `Generation` arrive on the returned sequence's `events`."""
        prompt, stops = self._render(params)
        rendered = len(prompt)
        if prefix:
            prompt = prompt + self._llm.tokenize(prefix.encode(), add_bos=False, special=False)
        if len(prompt) >= self.n_ctx:
            raise ValueError(f"Requested tokens ({len(prompt)}) exceed context window of {self.n_ctx}")
        # As llama-cpp-python does: no limit means up to the window, and never past it.
        wanted = params.max_tokens if params.max_tokens and params.max_tokens > 0 else self.n_ctx
        seq = _Seq(request_id=request_id, params=params, prompt=prompt, prompt_tokens=rendered,
                   stops=[s.encode() for s in stops], max_tokens=min(wanted, self.n_ctx - len(prompt)),
                   stream=stream, deadline=deadline)
        with self._cv:
            if self._closing:
                raise RuntimeError("engine closed")
            if request_id in self._by_id:
                raise ValueError(f"request {request_id!r} is already running")
            if request_id in self._early_aborts:
                seq.aborted = True
                del self._early_aborts[request_id]
            self._by_id[request_id] = seq
            self._waiting.append(seq)
            self._cv.notify_all()
        return seq

    def _render(self, params: GenerateParams) -> tuple[list[int], list[str]]:
        """The prompt's tokens and stop strings exactly as `create_chat_completion` would decode them."""
        with self._render_lock:
            try:
                self._llm.create_chat_completion(messages=params.messages, stop=params.stop or None, max_tokens=1)
            except _Rendered as rendered:
                return rendered.tokens, rendered.stop
        raise RuntimeError("the chat handler never rendered a prompt")

    def abort(self, request_id: str | None = None) -> bool:
        """Stop one request (all with None) before its next token; False when it is not here."""
        with self._cv:
            seqs = list(self._by_id.values()) if request_id is None else [self._by_id.get(request_id)]
            for seq in seqs:
                if seq is not None:
                    seq.aborted = True
            found = any(s is not None for s in seqs)
            if request_id is not None and not found:
                self._early_aborts[request_id] = None
                while len(self._early_aborts) > EARLY_ABORTS:
                    del self._early_aborts[next(iter(self._early_aborts))]
            self._cv.notify_all()
        return found

    def active(self) -> int:
        with self._cv:
            return len(self._by_id)

    # ---- the decode thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._closing and not self._waiting and not self._active:
                    self._cv.wait()
                if self._closing:
                    break
                newcomers = self._take_newcomers()
            try:
                self._expire()
                if newcomers:
                    self._admit(newcomers)
                if self._active:
                    self._step()
            except Exception as exc:  # a failed decode must not leave callers waiting for ever
                log.exception("batched decode failed; failing the sequences in it")
                self._fail_all(exc)
        self._fail_all(RuntimeError("engine closed"))

    def _take_newcomers(self) -> list[_Seq]:
        free = [s for s in range(self.max_batch) if s not in self._active]
        taken = []
        while self._waiting and free:
            seq = self._waiting.pop(0)
            if seq.aborted:
                self._finish(seq, "aborted")
                continue
            seq.slot = self._slot_for(seq, free)
            free.remove(seq.slot)
            self._active[seq.slot] = seq
            taken.append(seq)
        return taken

    def _slot_for(self, seq: _Seq, free: list[int]) -> int:
        """The free slot whose kept cells share most of this prompt; else one that keeps nothing; else the
        one kept longest (its cells are dropped when the sequence starts)."""
        age = {slot: i for i, slot in enumerate(self._idle)}
        return max(free, key=lambda s: (_common(seq.prompt, self._idle.get(s, [])), s not in age, -age.get(s, 0)))

    def _expire(self) -> None:
        now = time.monotonic()
        for seq in list(self._active.values()):
            if seq.aborted:
                self._finish(seq, "aborted")
            elif seq.deadline is not None and now > seq.deadline:
                self._finish(seq, "deadline")

    def _fail_all(self, exc: Exception) -> None:
        import llama_cpp

        with self._cv:
            seqs = list(self._by_id.values())
            self._waiting.clear()
        for seq in seqs:
            self._release(seq)
            seq.events.put(("error", exc))
        self._idle.clear()
        if not self._closing:
            llama_cpp.llama_memory_clear(self._mem, True)

    # ---- admission: prompts, with shared prefixes decoded once ---------------------------------------

    def _admit(self, newcomers: list[_Seq]) -> None:
        """Decode the newcomers' prompts in waves: a newcomer that shares more with another newcomer than
        with anything already cached waits for the next wave, when that one's KV is there to copy."""
        while newcomers:
            wave, later = [], []
            for seq in newcomers:
                cached = max((_common(seq.prompt, t) for t in self._cached_tokens()), default=0)
                pending = max((_common(seq.prompt, o.prompt) for o in wave), default=0)
                (later if min(pending, len(seq.prompt) - 1) > cached else wave).append(seq)
            self._prefill(wave)
            newcomers = later

    def _prefill(self, wave: list[_Seq]) -> None:
        """Copy each newcomer's longest cached prefix, decode the rest of its prompt (all newcomers in one
        batch, split at N_BATCH), and sample its first token from its last prompt token's logits."""
        import llama_cpp

        entries: list[tuple[int, int, int, bool]] = []  # token, pos, slot, wants logits
        last: dict[int, int] = {}  # slot -> index of its last prompt token in `entries`
        for seq in wave:
            seq.chain = self._sampler(seq.params)
            start = self._copy_cached_prefix(seq)
            entries.extend((seq.prompt[p], p, seq.slot, p == len(seq.prompt) - 1) for p in range(start, len(seq.prompt)))
            last[seq.slot] = len(entries) - 1
            self.stats["prompt_shared"] += start
            self.stats["prompt_decoded"] += len(seq.prompt) - start
            self.stats["admitted"] += 1
        for first in range(0, len(entries), N_BATCH):
            chunk = entries[first:first + N_BATCH]
            self._decode(chunk)
            for seq in wave:
                at = last[seq.slot] - first
                if 0 <= at < len(chunk):
                    seq.cached = list(seq.prompt)
                    self._advance(seq, llama_cpp.llama_sampler_sample(seq.chain, self._ctx.ctx, at))

    def _cached_tokens(self) -> list[list[int]]:
        return [o.cached for o in self._active.values()] + list(self._idle.values())

    def _copy_cached_prefix(self, seq: _Seq) -> int:
        """Give this sequence the longest prompt prefix its slot kept or another slot holds; its length."""
        import llama_cpp

        # At least the last prompt token is decoded again: its logits give the first sampled token.
        most = len(seq.prompt) - 1
        kept = min(_common(seq.prompt, self._idle.pop(seq.slot, [])), most)
        best, source = 0, -1
        holders = [(o.slot, o.cached) for o in self._active.values() if o is not seq] + list(self._idle.items())
        for slot, tokens in holders:
            n = _common(seq.prompt, tokens)
            if n > best:
                best, source = n, slot
        best = min(best, most)
        if kept > 0 and kept >= best:
            llama_cpp.llama_memory_seq_rm(self._mem, seq.slot, kept, -1)  # keep the shared start in place
            return kept
        llama_cpp.llama_memory_seq_rm(self._mem, seq.slot, -1, -1)  # whatever the slot kept, if anything
        if best <= 0:
            return 0
        if self.unified:
            # One buffer: the cells just gain this sequence's id; nothing is copied or recomputed.
            llama_cpp.llama_memory_seq_cp(self._mem, source, seq.slot, 0, best)
        else:
            # A buffer per sequence: llama.cpp copies whole buffers between them; drop what is not shared.
            llama_cpp.llama_memory_seq_cp(self._mem, source, seq.slot, -1, -1)
            llama_cpp.llama_memory_seq_rm(self._mem, seq.slot, best, -1)
        return best

    # ---- generation steps ----------------------------------------------------------------------------

    def _step(self) -> None:
        """Decode every active sequence's pending token in one batch, then sample each one's next."""
        import llama_cpp

        seqs = list(self._active.values())
        self._decode([(s.pending, len(s.cached), s.slot, True) for s in seqs])
        self.stats["steps"] += 1
        for i, seq in enumerate(seqs):
            seq.cached.append(seq.pending)
            self._advance(seq, llama_cpp.llama_sampler_sample(seq.chain, self._ctx.ctx, i))

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        import llama_cpp

        batch = self._batch
        for i, (token, pos, slot, logits) in enumerate(entries):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = slot
            batch.logits[i] = logits
        batch.n_tokens = len(entries)
        rc = llama_cpp.llama_decode(self._ctx.ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} for {len(entries)} tokens")

    def _advance(self, seq: _Seq, token: int) -> None:
        """Take a sampled token the way `Llama._create_completion` does: end of generation, stop strings,
        pieces held back while they may start a stop string or end inside a UTF-8 character, max_tokens."""
        import llama_cpp

        if llama_cpp.llama_vocab_is_eog(self._vocab, token):
            self._finish(seq, "stop")
            return
        seq.completion.append(token)
        seq.text += self._piece(token, first=len(seq.completion) == 1)
        self.stats["generated"] += 1
        seq.pending = token
        seq.multibyte_fix = _multibyte_fix(seq.text, seq.multibyte_fix)
        if seq.multibyte_fix > 0:
            seq.multibyte_fix -= 1
            return
        hits = [s for s in seq.stops if s in seq.text]
        if hits:
            seq.text = seq.text[: seq.text.index(hits[0])]
            self._finish(seq, "stop")
            return
        if seq.stream:
            self._emit(seq, len(seq.text) - _stop_overlap(seq.text[seq.sent:], seq.stops))
        if len(seq.completion) >= seq.max_tokens:
            self._finish(seq, "length")

    def _piece(self, token: int, *, first: bool) -> bytes:
        """The token's bytes as `LlamaModel.detokenize` concatenates them."""
        import llama_cpp

        n = llama_cpp.llama_token_to_piece(self._vocab, token, self._piece_buf, len(self._piece_buf), 0, False)
        piece = bytes(self._piece_buf[:n])
        # llama-cpp-python drops a leading space when the text starts with BOS; a completion never does
        # in practice, but the text must equal what it would give.
        if first and token == self._bos and piece[:1] == b" ":
            piece = piece[1:]
        return piece

    def _emit(self, seq: _Seq, end: int) -> None:
        """Hand out text[sent:end], less any trailing bytes of an unfinished UTF-8 character."""
        chunk = seq.text[seq.sent:end]
        for cut in range(min(4, len(chunk)) + 1):
            try:
                piece = chunk[: len(chunk) - cut].decode("utf-8")
            except UnicodeDecodeError:
                continue
            if piece:
                seq.events.put(("piece", piece))
                seq.sent += len(chunk) - cut
            return

    def _finish(self, seq: _Seq, reason: str) -> None:
        if seq.stream and seq.sent < len(seq.text):
            piece = seq.text[seq.sent:].decode("utf-8", errors="ignore")
            if piece:
                seq.events.put(("piece", piece))
            seq.sent = len(seq.text)
        done = Generation(text=seq.text.decode("utf-8", errors="ignore"), prompt_tokens=seq.prompt_tokens,
                          completion_tokens=len(seq.completion), finish_reason=reason,
                          seconds=time.perf_counter() - seq.started)
        self._release(seq)  # first: whoever gets the answer finds the slot free already
        seq.events.put(("done", done))

    def _release(self, seq: _Seq) -> None:
        """Leave the batch; the slot keeps the sequence's cells for a later prompt that starts the same way."""
        import llama_cpp

        if seq.slot >= 0 and self._active.get(seq.slot) is seq:
            del self._active[seq.slot]
            self._idle[seq.slot] = seq.cached
        if seq.chain is not None:
            llama_cpp.llama_sampler_free(seq.chain)
            seq.chain = None
        with self._cv:
            if self._by_id.get(seq.request_id) is seq:
                del self._by_id[seq.request_id]

    def _sampler(self, params: GenerateParams):
        """The chain `Llama._init_sampler` builds for these parameters, one per sequence."""
        import llama_cpp

        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        add = lambda smpl: llama_cpp.llama_sampler_chain_add(chain, smpl)  # noqa: E731
        # Called as llama-cpp-python calls it (its binding still passes n_vocab first), so a repeat
        # penalty behaves exactly as on the unbatched engine.
        add(llama_cpp.llama_sampler_init_penalties(self._llm.n_vocab(), PENALTY_LAST_N, params.repeat_penalty,
                                                   0.0, 0.0))
        seed = llama_cpp.LLAMA_DEFAULT_SEED if params.seed is None else params.seed & 0xFFFFFFFF
        if params.temperature < 0.0:
            add(llama_cpp.llama_sampler_init_dist(seed))
        elif params.temperature == 0.0:
            add(llama_cpp.llama_sampler_init_greedy())
        else:
            add(llama_cpp.llama_sampler_init_top_k(TOP_K))
            add(llama_cpp.llama_sampler_init_typical(TYPICAL_P, 1))
            add(llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
            add(llama_cpp.llama_sampler_init_min_p(MIN_P, 1))
            add(llama_cpp.llama_sampler_init_temp(params.temperature))
            add(llama_cpp.llama_sampler_init_dist(seed))
        return chain


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _multibyte_fix(text: bytes, current: int) -> int:
    """llama-cpp-python's count of tokens to wait while the text ends inside a UTF-8 character."""
    for k, char in enumerate(text[-3:]):
        k = 3 - k
        for num, pattern in ((2, 192), (3, 224), (4, 240)):
            if num > k and pattern & char == pattern:
                current = num - k
    return current


def _stop_overlap(text: bytes, stops: list[bytes]) -> int:
    """How many trailing bytes might be the start of a stop string (held back from the stream)."""
    longest = 0
    for stop in stops:
        for i in range(min(len(stop), len(text)), 0, -1):
            if text.endswith(stop[:i]):
                longest = max(longest, i)
                break
    return longest


class BatchedLlamaCppEngine(Engine):
    """The `Engine` interface over `BatchedLlama`: calls from several threads share the batch."""

    embedding = False

    def __init__(self, model_path: Path, *, n_ctx: int, threads: int, max_batch: int, kv_unified: bool = False,
                 n_gpu_layers: int = 0, main_gpu: int = 0, tensor_split: list[float] | None = None) -> None:
        self.model_path = model_path
        self.n_ctx = n_ctx
        self.threads = threads
        self.max_batch = max_batch
        self.core = BatchedLlama(model_path, n_ctx=n_ctx, threads=threads, max_batch=max_batch, unified=kv_unified,
                                 offload=gpu_offload(n_gpu_layers, main_gpu, tensor_split))

    def load(self) -> None:
        self.core.load()

    def generate(self, params: GenerateParams, *, request_id: str = "", deadline: float | None = None) -> Generation:
        seq = self.core.submit(params, request_id=request_id or uuid.uuid4().hex, deadline=deadline)
        while True:
            kind, value = seq.events.get()
            if kind == "done":
                return value
            if kind == "error":
                raise value

    def stream(self, params: GenerateParams, prefix: str = "", *, request_id: str = "",
               deadline: float | None = None) -> Generator[str, None, Generation]:
        rid = request_id or uuid.uuid4().hex
        seq = self.core.submit(params, request_id=rid, prefix=prefix, stream=True, deadline=deadline)
        ended = False
        try:
            while True:
                kind, value = seq.events.get()
                if kind == "piece":
                    yield value
                    continue
                ended = True
                if kind == "done":
                    return value
                raise value
        finally:
            if not ended:  # the consumer went away (generator closed): free the slot at the next step
                self.core.abort(rid)

    def embed(self, texts: list[str]) -> list[list[float]]:
        raise RuntimeError("a batched generation engine does not embed (embedding models use max_batch 1)")

    def abort(self, request_id: str | None = None) -> None:
        self.core.abort(request_id)

    def close(self) -> None:
        self.core.close()
