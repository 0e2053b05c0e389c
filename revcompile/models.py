"""Tiny models for tests, benchmarks, the demo and the CLI: random weights, no downloads.

Example:
    >>> from revcompile.models import tiny_model
    >>> model = tiny_model("mixtral", num_hidden_layers=4)
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import os

import torch
from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.utils import logging as transformers_logging

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
# Dots3-Note's sliding-window layers take their sizes from swa_* fields; its queries and keys have as many heads.
_DOTS3_TEXT = dict(num_key_value_heads=4, swa_num_attention_heads=4, swa_num_key_value_heads=4, swa_q_lora_rank=16,
                   swa_kv_lora_rank=16, swa_head_dim=16, swa_qk_nope_head_dim=8, swa_v_head_dim=16)
# Per-family fields beyond the rules by name (the zoo's families): what a default config lacks to build tiny and run
# (released checkpoints set these), keyed by model_type, a sub-config's too. A tuple is a per-layer pattern,
# repeated over the layers asked for; _LAYER_COUNT is the number of layers asked for, in a family that counts its
# layers in a field of its own (num_hidden_layers is then left to the config to derive).
_LAYER_COUNT = object()
_FIXES: dict[str, dict] = {
    "axk2": dict(topk_group=None),  # ungrouped routing (n_group=None) takes no topk_group
    "cohere_compass_text": dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
    # NOTE: transformers' defaults have no rope_theta, and clip_qkv=None, which the attention clamps with
    "dbrx": dict(attn_config=dict(rope_theta=500000.0, clip_qkv=8), ffn_config=dict(moe_top_k=2)),
    "dory": dict(n_input_layers=1, n_output_layers=1, n_recurrent_layers=None),  # these three add up to the layers
    "dots3_note_text": _DOTS3_TEXT,
    # the text fields at the top level, as in checkpoints; the adapters project onto the text width
    "dots3_note": _DOTS3_TEXT | dict(vision_config=dict(adapter_out_dim=64), audio_config=dict(adapter_out_dim=64)),
    "dots3_note_audio_encoder": dict(adapter_input_size=64),
    "dots3_note_vision_encoder": dict(pyramid_num_routed=(-1,), adapter_in_dim=64),  # dense (experts for 42 layers)
    # the MoE variant (26B-A4B): the dense default is the text family's (gemma4_text)
    "gemma4": dict(text_config=dict(enable_moe_block=True, moe_intermediate_size=32)),
    "lfm2_moe": dict(layer_types=("conv", "full_attention")),  # no default: checkpoints list them
    # each of its layers holds two attention sublayers, and its num_hidden_layers counts those (twice num_layers)
    "longcat_flash": dict(num_layers=_LAYER_COUNT),
    "mamba2": dict(head_dim=32),  # heads * head_dim must be expand * hidden_size
    # its own reversible layers, local and LSH attention in turn; chunks and positions for short sequences
    "reformer": dict(is_decoder=True, attn_layers=("local", "lsh"), axial_pos_embds=False, local_attn_chunk_length=4,
                     lsh_attn_chunk_length=4, num_buckets=2),
    "xmod": dict(is_decoder=True, default_language="en_XX"),
    "zamba2": dict(layers_block_type=("linear_attention", "hybrid")),  # its default is 54 layers, whatever the count
}
# The common size fields of a tiny config.
_SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=128, max_position_embeddings=256)
_TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _shrunk_sizes(fields: dict) -> dict:
    """Small values for the size fields of a config's `to_dict()`, found by name (no list of families).

    Example:
        >>> fields = AutoConfig.for_model("qwen3_next").to_dict()
        >>> _shrunk_sizes(fields)["num_experts"], _shrunk_sizes(fields)["linear_key_head_dim"]
        (4, 16)
    """
    small = {}
    for name, value in fields.items():
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
        elif "vocab" in name:  # vocab_size, vocab_size_per_layer_input, a hashed byte-group vocabulary (BLT)
            small[name] = 128
        elif ("num" in name or name.endswith("attention_heads")) and "heads" in name and name != "num_key_value_heads":
            small[name] = min(value, 2 if "key_value" in name else 4)  # (num_key_value_heads: one of _SIZES)
        elif name.endswith("_layers") and "window" not in name and value > 2:  # encoder_layers, decoder_layers
            small[name] = 2
        elif name.endswith(("hidden_size_per_layer_input", "d_state", "state_size")) and value > 16:
            small[name] = 16
        elif name.startswith("hidden_size_") and value > 64:  # the width of another stack (BLT's global one)
            small[name] = 64
    if "qk_head_dim" in small:  # derived: nope + rope
        small["qk_head_dim"] = small.get("qk_nope_head_dim", 8) + small.get("qk_rope_head_dim", 8)
    if "qk_rope_head_dim" in small and fields.get("head_dim") == fields["qk_rope_head_dim"]:
        small["head_dim"] = small["qk_rope_head_dim"]  # latent attention whose rotary embedding takes head_dim
    return small


def _settable(config_class: type[PretrainedConfig], fields: dict) -> dict:
    """`fields` less those `config_class` refuses: a property whose setter raises NotImplementedError, as ProphetNet's
    num_hidden_layers (its stacks count their own layers) and XLNet's max_position_embeddings (it has none)."""
    default, kept = None, {}
    for name, value in fields.items():
        if isinstance(inspect.getattr_static(config_class, name, None), property):
            default = default or config_class()
            try:
                setattr(default, name, value)
            except NotImplementedError:
                continue
        kept[name] = value
    return kept


def _fixes(model_type: str, layers: int) -> dict:
    """The family's `_FIXES`, its per-layer patterns repeated over `layers` layers.

    Example:
        >>> _fixes("lfm2_moe", 3)["layer_types"]
        ['conv', 'full_attention', 'conv']
    """
    return {name: [value[i % len(value)] for i in range(layers)] if isinstance(value, tuple) else
            layers if value is _LAYER_COUNT else value for name, value in _FIXES.get(model_type, {}).items()}


def _tiny_sub_configs(config: PretrainedConfig, sizes: dict) -> dict:
    """Fields for the sub-configs of `config` (text_config, vision_config, attn_config, ...) still full-size: the
    size fields shrunk by name as at the top level, and the common ones (`_SIZES`) and `sizes` (the layers asked
    for, the caller's overrides) where a sub-config has them, never above its own; {} where all are tiny already.

    Example:
        >>> sorted(_tiny_sub_configs(AutoConfig.for_model("llama4"), {"num_hidden_layers": 3}))
        ['text_config', 'vision_config']
    """
    tiny = {}
    for name, sub in vars(config).items():
        if not isinstance(sub, PretrainedConfig):
            continue
        fields = sub.to_dict()
        small = _shrunk_sizes(fields)
        for k, v in (_SIZES | sizes).items():
            own = fields.get(k)
            if type(own) is int:
                small[k] = min(v, own)
            elif isinstance(own, list) and all(type(x) is int for x in own):  # per layer (Gemma-3n's widths)
                small[k] = v
        vocab = small.get("vocab_size", fields.get("vocab_size"))
        if vocab is not None:  # token ids beyond the tiny vocabulary
            small.update({k: v for k, v in _TOKENS.items() if type(fields.get(k)) is int and fields[k] >= vocab})
        small.update(_fixes(sub.model_type, small.get("num_hidden_layers", 0)))
        small.update(_tiny_sub_configs(sub, sizes))
        if any(fields.get(k) != v for k, v in small.items()):
            # NOTE: the fields it derives from others (declared None: layer_types, moe_layers, a width; the
            # per-layer overrides of a heterogeneous config) are left out, so that it derives them again from the
            # tiny sizes and the layers asked for, as at the top level
            derived = {f.name for f in dataclasses.fields(sub) if f.default is None} | {"per_layer_config"}
            tiny[name] = {k: v for k, v in fields.items() if k not in derived} | small
    return tiny


def tiny_config(model_type: str, **overrides) -> PretrainedConfig:
    """A small config of `model_type` (a transformers model_type such as "mixtral"), no download.

    Unknown families still work when transformers knows them: the common size fields, and the size fields of the
    family's default config found by name (`_shrunk_sizes`), are shrunk, in its sub-configs too (`_tiny_sub_configs`).

    Example:
        >>> config = tiny_config("qwen3_5_moe", num_hidden_layers=3)
        >>> config.text_config.hidden_size, config.text_config.num_hidden_layers, config.text_config.num_experts
        (64, 3, 4)
    """
    base = _shrunk_sizes(AutoConfig.for_model(model_type).to_dict())
    base.update(_SIZES, tie_word_embeddings=False, **_TOKENS, attn_implementation="eager",
                experts_implementation="eager")
    if "kv_lora_rank" in base:  # multi-head latent attention (DeepSeek-V2): its keys are per head, never shared
        base["num_key_value_heads"] = base["num_attention_heads"]
    base.update(_TINY.get(model_type, {}))
    layers = overrides.get("num_hidden_layers", base["num_hidden_layers"])
    base.update(_fixes(model_type, layers))
    base.update(overrides)
    if _LAYER_COUNT in _FIXES.get(model_type, {}).values():
        del base["num_hidden_layers"]
    if model_type == "gpt_neo":  # its layer pattern, [[types, repeats]], must cover exactly the layers asked for
        base.setdefault("attention_types", [[["global"], base["num_hidden_layers"]]])
    if "head_dim" in base and base["head_dim"] is None:
        base["head_dim"] = base["hidden_size"] // base["num_attention_heads"]
    attn, experts = base.pop("attn_implementation"), base.pop("experts_implementation")
    sizes = {"num_hidden_layers": layers, **overrides}
    # NOTE: by their own names: a config sets aliased fields (hidden_size for DBRX's d_model) only after its
    # __post_init__, which would copy the full-size value into a sub-config (DBRX's ffn_config.hidden_size)
    aliases = CONFIG_MAPPING[model_type].attribute_map
    base = _settable(CONFIG_MAPPING[model_type], {aliases.get(k, k): v for k, v in base.items()})
    config = AutoConfig.for_model(model_type, **base)
    # NOTE: built first from the top-level fields alone: some composite configs hand them to a sub-config (Fuyu's
    # text_config), which is then tiny already
    sub_configs = _tiny_sub_configs(config, sizes)
    if sub_configs:
        config = AutoConfig.for_model(model_type, **(base | sub_configs))
    config._attn_implementation = attn
    config._experts_implementation = experts  # eager runs in every dtype; grouped_mm has no float64 kernel
    return config


def load_model(spec: str, layers: int | None = None, dtype: torch.dtype | None = None,
               **overrides) -> torch.nn.Module:
    """A causal LM from a model_type (tiny config, random weights) or from a local directory with config.json (its
    weights where it has them, else random ones); `layers`: only the first that many decoder layers (`first_layers`:
    of a checkpoint, the weights of the others are never read); `dtype`: loaded in it as `from_pretrained` loads
    (`as_loaded`; None: a checkpoint's own dtype, else float32).

    Raises ValueError with what to do when `spec` is neither.

    Example:
        >>> load_model("/models/Qwen3-30B-A3B", layers=4)     # four real layers, not 48 (and not 60 GB)
    """
    if os.path.isdir(spec):
        if not os.path.exists(os.path.join(spec, "config.json")):
            raise ValueError(f"{spec!r} is a directory without a config.json; pass a model directory or a model_type")
        config = AutoConfig.from_pretrained(spec, **overrides)
        if layers is not None:
            config = first_layers(config, layers)
        if not any(f.endswith((".safetensors", ".bin")) for f in os.listdir(spec)):
            return tiny_model_from_config(config, dtype or torch.float32)
        verbosity = transformers_logging.get_verbosity()
        transformers_logging.set_verbosity_error()  # (not its report of the weights of the layers left out)
        try:
            return AutoModelForCausalLM.from_pretrained(spec, config=config, dtype=dtype or "auto")
        finally:
            transformers_logging.set_verbosity(verbosity)
    if layers is not None:
        overrides["num_hidden_layers"] = layers
    try:
        config = tiny_config(spec, **overrides)
    except (KeyError, ValueError) as err:
        raise ValueError(f"unknown model {spec!r}: not a local directory and not a transformers model_type "
                         f"(try one of {', '.join(TINY_FAMILIES)})") from err
    return tiny_model_from_config(config, dtype or torch.float32)


def first_layers(config: PretrainedConfig, n: int) -> PretrainedConfig:
    """A copy of `config` with only its first `n` decoder layers: `num_hidden_layers` (of its text config, for a
    composite one) set to `n`, and each per-layer list (one as long as the layers: `layer_types`...) cut to match.

    Raises ValueError when the model has fewer than `n` layers.
    """
    config = copy.deepcopy(config)
    text = config.get_text_config()
    total = getattr(text, "num_hidden_layers", None)
    if total is None:
        raise ValueError(f"the {config.model_type} config has no num_hidden_layers to cut; leave the layer count out")
    if n > total:
        raise ValueError(f"the model has {total} layers, fewer than the {n} asked for")
    for key, value in list(vars(text).items()):
        if isinstance(value, (list, tuple)) and len(value) == total:
            setattr(text, key, type(value)(value[:n]))
    text.num_hidden_layers = n
    return config


def tiny_model(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> torch.nn.Module:
    """A randomly initialised causal LM of a tiny `model_type` config, seeded, in `dtype` (`tiny_model_from_config`).
    """
    torch.manual_seed(seed)
    return tiny_model_from_config(tiny_config(model_type, **overrides), dtype)


def tiny_model_from_config(config: PretrainedConfig, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The causal LM of `config`, its weights drawn in float32 from the current seed, then in `dtype` (`as_loaded`).
    """
    try:
        model = AutoModelForCausalLM.from_config(config)
    except ValueError as err:
        if "Unrecognized configuration class" not in str(err):  # the model's own objection to its config
            raise
        raise ValueError(f"model_type {config.model_type!r} has no causal-LM class in transformers") from err
    return as_loaded(model, dtype)


def as_loaded(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`model` (a Hugging Face model) in `dtype`: in a 16-bit dtype a copy as `from_pretrained(path, dtype=dtype)`
    would load its weights, else `model.to(dtype)`.

    NOTE: not `model.to(bfloat16)`, which casts everything: a checkpoint loaded in bf16 keeps in float32 the
    parameters its class keeps there (DeepSeek-V3's and GLM-4-MoE's router weights and score-correction biases,
    `_keep_in_fp32_modules`) and the buffers the model computes at init (RoPE's inverse frequencies), so that is the
    model users train, and the one measured here. In float64 (the tests' exact references) everything is cast.

    Example:
        >>> model = as_loaded(pretrained_fp32, torch.bfloat16)    # routers and RoPE frequencies stay float32
    """
    if dtype not in (torch.bfloat16, torch.float16) or not hasattr(model, "config"):
        return model.to(dtype)
    with torch.random.fork_rng(devices=[]):  # (the copy's own random init must not move the caller's seed)
        loaded = type(model)._from_config(model.config, dtype=dtype)
    loaded.load_state_dict(model.state_dict())
    return loaded.to(next(model.parameters()).device).train(model.training)
