"""Tiny random-weight models built deterministically from configs: the test suite's
fixtures. (`perp demo`'s embedded default is a trained model shipped in perp_cli/demo/model.)

Each family of the architecture map has a config here small enough to build in
milliseconds, with dimensions chosen so that every N:M pattern up to 4:8 divides every
input dimension. The tokenizer is byte-level (256 bytes + specials), built in code, so
no file and no network is needed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

VOCAB = 320  # 256 byte tokens, 4 specials, the rest unused
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")

FAMILY_CONFIGS: dict[str, dict[str, Any]] = {
    "opt": dict(
        hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64,
        max_position_embeddings=256, enable_bias=True, do_layer_norm_before=True,
    ),
    "llama": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256,
    ),
    "mistral": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, sliding_window=None,
    ),
    "qwen2": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256,
    ),
    "mixtral": dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, num_local_experts=4, num_experts_per_tok=2,
    ),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=256, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
}

DEFAULT_FAMILY = "opt"


def build_config(family: str, **overrides: Any) -> Any:
    from transformers import AutoConfig

    kwargs = dict(FAMILY_CONFIGS[family])
    kwargs.update(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True)
    kwargs.update(overrides)
    return AutoConfig.for_model(family, **kwargs)


def build_model(family: str = DEFAULT_FAMILY, seed: int = 0, **overrides: Any) -> nn.Module:
    """A randomly initialised tiny causal LM, identical for the same family and seed."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(build_config(family, **overrides), dtype=torch.float32)
    # Biases and norm weights start at 0 and 1; nudge them so tests can tell if they change.
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.02 * torch.randn(p.shape, generator=gen))
    return model.eval()


def build_tokenizer() -> Any:
    """A byte-level tokenizer: every UTF-8 byte is one token, no merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(byte_chars):
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        model_max_length=256,
    )
