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

# Sizes for `shrunk_config`: set wherever a config has the attribute (directly or through
# its attribute_map), so any family's own config class builds a model of ~100k weights.
# Dimensions keep every N:M pattern up to 4:8 dividing the inputs, and no two of the
# hidden (64), intermediate (128), expert (32) and expert-count (4) sizes coincide, so the
# orientation of fused experts is never ambiguous.
SHRINK: dict[str, Any] = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    num_kv_heads=2, head_dim=16, max_position_embeddings=256, n_positions=256, max_seq_len=256, n_ctx=256,
    moe_intermediate_size=32, shared_expert_intermediate_size=32, intermediate_size_mlp=128, ffn_hidden_size=128,
    ffn_dim=128, n_inner=128, num_local_experts=4, num_experts=4, n_routed_experts=4, moe_num_experts=4,
    num_experts_per_tok=2, n_shared_experts=1, rotary_dim=8, sliding_window=32, attention_chunk_size=32,
    kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, qk_head_dim=32, v_head_dim=16, n_group=1,
    topk_group=1, first_k_dense_replace=1, linear_num_key_heads=2,
    linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16, global_attn_every_n_layers=1,
    decoder_layers=2, encoder_layers=2, decoder_ffn_dim=128, encoder_ffn_dim=128, decoder_attention_heads=4,
    encoder_attention_heads=4, d_model=64, d_ff=128, num_layers=2, num_heads=4, n_layer=2, n_head=4,
)
_PER_LAYER_INDEX_LISTS = ("moe_layers", "mlp_only_layers", "full_attn_idxs", "attn_layer_indices")


def build_config(family: str, **overrides: Any) -> Any:
    from transformers import AutoConfig

    kwargs = dict(FAMILY_CONFIGS[family])
    kwargs.update(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True)
    kwargs.update(overrides)
    return AutoConfig.for_model(family, **kwargs)


def shrunk_config(model_type: str, **overrides: Any) -> Any:
    """`model_type`'s own config class with every size it has made tiny (`SHRINK`).

    Sub-configs (a multimodal model's text and vision configs) are shrunk the same way.
    Per-layer lists (`layer_types`, `no_rope_layers`, ...) are cut to the new depth keeping
    one layer of each kind, and layer-index lists keep the indices that still exist, so
    hybrid layouts survive.
    """
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type)
    _shrink(config, {**SHRINK, "vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, **overrides})
    return config


def _shrink(config: Any, values: dict[str, Any], depth: int = 0) -> None:
    from transformers import PretrainedConfig

    def get(key: str) -> Any:
        try:
            return getattr(config, key)
        except Exception:  # properties that refuse (per-layer attributes, derived sizes)
            return None

    layers_before = get("num_hidden_layers")
    values = dict(values)
    if get("num_key_value_heads") is not None and get("num_key_value_heads") == get("num_attention_heads"):
        values["num_key_value_heads"] = values.get("num_attention_heads")  # no grouped-query attention in this family
    for key, value in values.items():
        current = get(key)
        settable = isinstance(current, (int, float)) and not isinstance(current, bool)
        moe_without_top_k = key == "num_experts_per_tok" and current is None and (get("num_local_experts") or get("n_routed_experts"))
        if settable or moe_without_top_k:
            try:
                setattr(config, key, value)
            except Exception:
                pass
    layers = get("num_hidden_layers")
    for key, value in list(vars(config).items()):
        if isinstance(value, PretrainedConfig) and depth < 2:
            _shrink(value, values, depth + 1)
        elif isinstance(value, list) and layers_before and len(value) == layers_before and key not in _PER_LAYER_INDEX_LISTS:
            kinds = list(dict.fromkeys(value))  # keep one layer of each kind (hybrids: attention and linear layers)
            setattr(config, key, (kinds + value)[:layers] if len(kinds) <= layers else value[:layers])
        elif key in _PER_LAYER_INDEX_LISTS and isinstance(value, list) and layers:
            setattr(config, key, [i for i in value if isinstance(i, int) and i < layers])
        elif isinstance(value, dict) and value and layers and all(str(k).isdigit() for k in value):
            setattr(config, key, {k: v for k, v in value.items() if int(k) < layers})  # per-layer overrides


def build_model(family: str = DEFAULT_FAMILY, seed: int = 0, **overrides: Any) -> nn.Module:
    """A randomly initialised tiny causal LM, identical for the same family and seed.

    `family` is a key of `FAMILY_CONFIGS` or any other causal-LM model type (sized by
    `shrunk_config`)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = build_config(family, **overrides) if family in FAMILY_CONFIGS else shrunk_config(family, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
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
