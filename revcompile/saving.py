"""Reload a converted model as it was trained: `revcompile.from_pretrained(path)`.

A converted Hugging Face model saves like any other (`model.save_pretrained(path)`): its state_dict keys are the
original ones plus the modules a scheme added (`...revcompile_modules...`: MEFT's adapters, RevFFN's projections),
and its config.json carries the conversion under the key "revcompile" (make_reversible records every option of the
call). Weights trained under a scheme that changes the function mean something only under that scheme, so the
checkpoint is loaded and converted again the same way, and the added modules get their trained weights.

Example:
    >>> revcompile.make_reversible(model, "meft1", lam=0.05)
    >>> train(model); model.save_pretrained("out")
    >>> model = revcompile.from_pretrained("out")       # converted as it was: the trained function, exactly
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager

from torch import nn

from .api import RECORD_KEY, make_reversible
from .errors import RevcompileError
from .runtime.layer import NEW_MODULES

_UNSET = object()
NOT_CALL_OPTIONS = ("options", "layers", "not_recorded")  # record entries that are not make_reversible arguments
# make_reversible options that change how the converted model runs on this machine, not what it computes
RUN_OPTIONS = ("head", "head_chunk_tokens", "recompute_chunks", "compile")


def from_pretrained(path: str, *, run_options: dict | None = None, **kwargs) -> nn.Module:
    """Load a model saved from a converted one and convert it as recorded in its config.json.

    run_options: make_reversible options to take instead of the recorded ones, among RUN_OPTIONS (how the model
    runs here, not what it computes): a checkpoint trained with head="liger" on a GPU loads on a CPU with
    `run_options={"head": "chunked"}`. kwargs go to transformers' `AutoModelForCausalLM.from_pretrained` (dtype,
    device_map, attn_implementation...). Raises RevcompileError when the checkpoint records no conversion, records
    one that cannot be rebuilt (a ready-made Scheme object, a non-JSON option), or converts other layers than were
    recorded, and for a run option that is not one.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    changes_function = sorted(set(run_options or {}) - set(RUN_OPTIONS))
    if changes_function:
        raise RevcompileError(f"run_options {changes_function} would change what the saved model computes; only "
                              f"{', '.join(RUN_OPTIONS)} may differ from the recorded conversion")
    config = AutoConfig.from_pretrained(path)
    record = getattr(config, RECORD_KEY, None)
    if not record:
        raise RevcompileError(f"{path} records no revcompile conversion (its config.json has no {RECORD_KEY!r} key): "
                              "it was saved from an unconverted model; load it with transformers' from_pretrained "
                              "and call revcompile.make_reversible")
    if record.get("not_recorded"):
        raise RevcompileError(f"{path} was converted with options that could not be recorded "
                              f"({', '.join(record['not_recorded'])}): load it with transformers' from_pretrained "
                              "and call revcompile.make_reversible with them yourself")
    model_class = _causal_lm_class(config, path)
    with _ignoring_added_keys(model_class):  # the added modules are loaded below
        model = (AutoModelForCausalLM if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING else model_class
                 ).from_pretrained(path, **kwargs)
    recorded = {k: v for k, v in record.items() if k not in NOT_CALL_OPTIONS}
    make_reversible(model, **{**recorded, **(run_options or {})}, **record["options"])
    layers = [pair.layer for pair in model._revcompile_plan.pairs]
    if layers != record["layers"]:
        raise RevcompileError(f"{path}: converting again gave layers {layers}, the checkpoint records "
                              f"{record['layers']}; load it with transformers and convert it yourself")
    added = {name: tensor for name, tensor in model.state_dict().items() if f".{NEW_MODULES}." in name}
    if added:
        # the names save_pretrained gave them: it applies the family's key renamings in reverse (transformers v5
        # turns "p_in_mlp.weight" into "p_in.block_sparse_moe.weight" for Mixtral), a mapping that cannot be undone
        from transformers.core_model_loading import revert_weight_conversion

        file_names = {next(iter(revert_weight_conversion(model, {name: tensor}))): name
                      for name, tensor in added.items()}
        saved = _load_tensors(path, set(file_names))
        missing = sorted(set(file_names) - set(saved))
        if missing:
            raise RevcompileError(f"{path} lacks the weights of modules the {record['scheme']!r} scheme adds "
                                  f"({len(missing)} missing, e.g. {missing[0]})")
        model.load_state_dict({file_names[name]: tensor for name, tensor in saved.items()}, strict=False)
    return model


def _causal_lm_class(config, path: str) -> type:
    """The class AutoModelForCausalLM loads `config` with, or else the transformers class config.json's
    `architectures` names: a causal LM whose config is a text sub-config (Emu3's, Mllama's) is not in the
    auto-mapping, and AutoModelForCausalLM cannot load it from a directory."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    import transformers

    for name in getattr(config, "architectures", None) or ():
        model_class = getattr(transformers, name, None)
        if isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel):
            return model_class
    raise RevcompileError(f"{path}: transformers has no causal LM class for {type(config).__name__} (config.json "
                          f"names {getattr(config, 'architectures', None)}); load the model with its class and call "
                          "revcompile.make_reversible with the options its config records under "
                          f"{RECORD_KEY!r}")


@contextmanager
def _ignoring_added_keys(cls: type):
    """Hugging Face's loader does not report the added modules' keys as unexpected (they are loaded afterwards)."""
    name = "_keys_to_ignore_on_load_unexpected"
    own = cls.__dict__.get(name, _UNSET)
    setattr(cls, name, [*(getattr(cls, name) or ()), rf"\.{NEW_MODULES}\."])
    try:
        yield
    finally:
        if own is _UNSET:
            delattr(cls, name)
        else:
            setattr(cls, name, own)


def _load_tensors(path: str, names: set[str]) -> dict:
    """The tensors `names` from a checkpoint directory's safetensors file(s)."""
    from safetensors import safe_open

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted({file for name, file in json.load(f)["weight_map"].items() if name in names})
    else:
        files = ["model.safetensors"]
    tensors = {}
    for file in files:
        with safe_open(os.path.join(path, file), framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys() if name in names})
    return tensors
