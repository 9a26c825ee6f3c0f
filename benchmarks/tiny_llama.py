"""A tiny Llama with random weights, written locally for vLLM runs (the `gpu` tests and benchmarks/vllm_bench.py):
nothing is downloaded. Its answers are noise, which is all a serving measurement needs.

Needs torch, transformers and tokenizers (vLLM's own dependencies, so present wherever vLLM is)."""

from __future__ import annotations

from pathlib import Path

VOCAB_WORDS = 1000  # prompts are written from words w0..w999


def build_tiny_llama(folder: Path, *, layers: int = 2, hidden: int = 256) -> Path:
    """A `layers`-layer Llama (float16) with a word-level tokenizer and a chat template, saved into `folder`."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(VOCAB_WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = ("{{ bos_token }}{% for m in messages %}{{ m['content'] }} {% endfor %}"
                          "{% if add_generation_prompt %}w0 {% endif %}")
    fast.save_pretrained(folder)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, torch_dtype="float16")
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.float16).save_pretrained(folder)
    return folder


def prompt_words(i: int, n: int = 16) -> str:
    """A prompt of `n` words the tokenizer knows, different for each `i`."""
    return " ".join(f"w{(i * 7 + k) % VOCAB_WORDS}" for k in range(n))
