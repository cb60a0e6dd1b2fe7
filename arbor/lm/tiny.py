"""The tiny default policy: a ~1M-parameter Llama- or GPT-2-style model over the character tokenizer.

Built from `ModelConfig`, randomly initialised; `bootstrap` trains it with SFT. Nothing is downloaded.
"""

from __future__ import annotations

from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from arbor.pipeline.config import ModelConfig


def build_tiny_model(cfg: ModelConfig, tokenizer: object) -> PreTrainedModel:
    """A freshly initialised causal LM for `tokenizer` (vocab, pad/bos/eos ids) with the shape of `cfg`."""
    common = {
        "vocab_size": len(tokenizer),  # type: ignore[arg-type]
        "bos_token_id": tokenizer.bos_token_id,  # type: ignore[attr-defined]
        "eos_token_id": tokenizer.eos_token_id,  # type: ignore[attr-defined]
        "pad_token_id": tokenizer.pad_token_id,  # type: ignore[attr-defined]
    }
    if cfg.arch == "llama":
        conf = LlamaConfig(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                           num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                           num_key_value_heads=cfg.num_heads, max_position_embeddings=cfg.max_positions,
                           tie_word_embeddings=True, **common)
        return LlamaForCausalLM(conf)
    conf = GPT2Config(n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_heads,
                      n_positions=cfg.max_positions, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
    return GPT2LMHeadModel(conf)
