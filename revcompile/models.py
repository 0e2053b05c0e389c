"""Tiny models for tests, benchmarks, the demo and the CLI: random weights, no downloads.

Example:
    >>> from revcompile.models import tiny_model
    >>> model = tiny_model("mixtral", num_hidden_layers=4)
"""

from __future__ import annotations

import os

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

# Per-family overrides that make a config tiny (a few layers, width 64) while keeping its structure:
# DeepSeek-V3 keeps dense first layers, GLM-4-MoE and Qwen2-MoE keep shared experts, GPT-OSS keeps its
# sliding/full layer pattern.
_TINY: dict[str, dict] = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=64),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    "deepseek_v3": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1,
                        num_key_value_heads=4, n_group=2, topk_group=1, kv_lora_rank=16, q_lora_rank=32,
                        qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=16, head_dim=8),
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16, sliding_window=8),
    "granitemoe": dict(num_local_experts=4, num_experts_per_tok=2, residual_multiplier=0.5),
    "phimoe": dict(num_local_experts=4, num_experts_per_tok=2),
    "glm4_moe": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1,
                     n_group=1, topk_group=1, head_dim=16),
    "llama": dict(head_dim=16),
}
TINY_FAMILIES: tuple[str, ...] = tuple(_TINY)


def _shrunk_sizes(model_type: str) -> dict:
    """Small values for the size fields of a family's default config, found by name (no list of families).

    Example:
        >>> _shrunk_sizes("qwen3_next")["num_experts"], _shrunk_sizes("qwen3_next")["linear_key_head_dim"]
        (4, 16)
    """
    small = {}
    for name, value in AutoConfig.for_model(model_type).to_dict().items():
        if name == "head_dim" and value is None:  # some families derive it from the full-size width: set by tiny_config
            small[name] = None
        if "rotary_dim" in name and isinstance(value, int) and value > 8:  # rotary features of a head (GPT-J)
            small[name] = 8
        if value is None and ("expert" in name or "topk" in name):  # set from other fields at full size
            value = 2 ** 31
        if not isinstance(value, int) or isinstance(value, bool) or name.endswith("_id") or "position" in name:
            continue
        if "per_tok" in name or "topk" in name.replace("_", "") and "group" not in name or name == "moe_k":
            small[name] = min(value, 2)  # experts each token picks
        elif "group" in name and ("expert" in name or "topk" in name or name in ("n_group", "n_groups")):
            small[name] = 1  # expert groups (DeepSeek's grouped top-k), state-space head groups (Mamba-2)
        elif "expert" in name and "size" not in name and "dim" not in name:
            small[name] = min(value, 4 if "shared" not in name else 1)  # expert counts
        elif "head_dim" in name:
            small[name] = 8 if ("rope" in name or "nope" in name) else 16
        elif "lora_rank" in name:
            small[name] = 16
        elif ("intermediate_size" in name or "ffn_hidden_size" in name) and name != "intermediate_size":
            small[name] = 32
        elif "vocab_size" in name:
            small[name] = 128
        elif "num" in name and "heads" in name and "key_value" not in name:
            small[name] = min(value, 4)
        elif name.endswith("_layers") and "window" not in name and value > 2:  # encoder_layers, decoder_layers
            small[name] = 2
        elif name.endswith(("hidden_size_per_layer_input", "d_state", "state_size")) and value > 16:
            small[name] = 16
    if "qk_head_dim" in small:  # derived: nope + rope
        small["qk_head_dim"] = small.get("qk_nope_head_dim", 8) + small.get("qk_rope_head_dim", 8)
    return small


def tiny_config(model_type: str, **overrides) -> PretrainedConfig:
    """A small config of `model_type` (a transformers model_type such as "mixtral"), no download.

    Unknown families still work when transformers knows them: the common size fields, and the size fields of the
    family's default config found by name (`_shrunk_sizes`), are shrunk.
    """
    base = _shrunk_sizes(model_type)
    base.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, tie_word_embeddings=False,
                pad_token_id=0, bos_token_id=1, eos_token_id=2,
                attn_implementation="eager", experts_implementation="eager")
    if "kv_lora_rank" in base:  # multi-head latent attention (DeepSeek-V2): its keys are per head, never shared
        base["num_key_value_heads"] = base["num_attention_heads"]
    base.update(_TINY.get(model_type, {}))
    base.update(overrides)
    if model_type == "gpt_neo":  # its layer pattern, [[types, repeats]], must cover exactly the layers asked for
        base.setdefault("attention_types", [[["global"], base["num_hidden_layers"]]])
    if "head_dim" in base and base["head_dim"] is None:
        base["head_dim"] = base["hidden_size"] // base["num_attention_heads"]
    attn, experts = base.pop("attn_implementation"), base.pop("experts_implementation")
    config = AutoConfig.for_model(model_type, **base)
    config._attn_implementation = attn
    config._experts_implementation = experts  # eager runs in every dtype; grouped_mm has no float64 kernel
    return config


def load_model(spec: str, **overrides) -> torch.nn.Module:
    """A causal LM from a model_type (tiny config, random weights) or from a local directory with config.json.

    Raises ValueError with what to do when `spec` is neither.
    """
    if os.path.isdir(spec):
        if not os.path.exists(os.path.join(spec, "config.json")):
            raise ValueError(f"{spec!r} is a directory without a config.json; pass a model directory or a model_type")
        has_weights = any(f.endswith((".safetensors", ".bin")) for f in os.listdir(spec))
        if has_weights:
            return AutoModelForCausalLM.from_pretrained(spec, **overrides)
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(spec, **overrides))
    try:
        config = tiny_config(spec, **overrides)
    except (KeyError, ValueError) as err:
        raise ValueError(f"unknown model {spec!r}: not a local directory and not a transformers model_type "
                         f"(try one of {', '.join(TINY_FAMILIES)})") from err
    return tiny_model_from_config(config)


def tiny_model(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> torch.nn.Module:
    """A randomly initialised causal LM of a tiny `model_type` config, seeded, in `dtype`."""
    torch.manual_seed(seed)
    return tiny_model_from_config(tiny_config(model_type, **overrides)).to(dtype)


def tiny_model_from_config(config: PretrainedConfig) -> torch.nn.Module:
    try:
        return AutoModelForCausalLM.from_config(config)
    except ValueError as err:
        raise ValueError(f"model_type {config.model_type!r} has no causal-LM class in transformers") from err
