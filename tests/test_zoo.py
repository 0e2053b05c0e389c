"""The zoo: every causal-LM family of the installed transformers converts with gradients equal to the reference,
or is skipped with a reason (revcompile/zoo.py), in float64, bfloat16 and under bfloat16 autocast. A fast sample of
the layer forms runs by default; every family and precision under `pytest -m slow tests/test_zoo.py`
(`python bench/zoo.py` writes the table)."""

import pytest
import torch

from revcompile.coupling import Step
from revcompile.zoo import (BIT_FOR_BIT, BOUND, CONVERTED, GENERATE_OUTCOMES, MAX_PARAMETERS, MISMATCH, NOT_BUILT,
                            PRECISIONS, SKIPPED, build, causal_lm_families, run_family)

# one family per layer form and per case that used to fail: sequential MoE; the MoE whose `.view` of a sequence
# slice crashed backward (flex_olmo); parallel residual (phi); post-norm (openai-gpt) and extra outputs (bloom),
# both converted whole
SAMPLE = {"mixtral": "sequential", "flex_olmo": "sequential", "phi": "parallel", "openai-gpt": "whole layer",
          "bloom": "whole layer"}
DEFAULT_SCHEME = {"sequential": "symplectic", "parallel": "symplectic", "whole layer": "midpoint"}


def check(result):
    """Fail on a crash or a mismatch; skip with the reason otherwise, so `-rs` lists every skip."""
    assert result.status in (CONVERTED, SKIPPED, NOT_BUILT), f"{result.family} {result.status}: {result.reason}"
    if result.status != CONVERTED:
        pytest.skip(f"{result.family} {result.status}: {result.reason}")
    assert result.error <= BOUND[result.bound] or result.bound == BIT_FOR_BIT and result.layer_error == 0


def test_families_come_from_transformers_auto_mapping():
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    assert causal_lm_families() == sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) and len(causal_lm_families()) > 100


@pytest.mark.parametrize("family", sorted(SAMPLE))
def test_sample_converts_with_reference_gradients(family):
    result = run_family(family)
    assert result.status == CONVERTED, result.reason
    form = SAMPLE[family]
    assert result.forms == {form: result.layers} and result.schemes == {DEFAULT_SCHEME[form]: result.layers}
    assert result.error <= BOUND[result.bound]


@pytest.mark.parametrize("scheme", ["midpoint", "leapfrog"])
@pytest.mark.parametrize("family", ["openai-gpt", "bloom", "opt"])
def test_whole_layer_schemes_on_families(family, scheme):
    result = run_family(family, scheme)
    assert result.status == CONVERTED and result.forms == {"whole layer": result.layers}, result.reason
    assert result.error <= BOUND[result.bound]


@pytest.mark.parametrize("scheme", ["symplectic", "midpoint", "leapfrog"])
def test_parallel_layers_with_each_scheme(scheme):
    result = run_family("cohere", scheme)
    assert result.status == CONVERTED and result.forms == {"parallel": result.layers}, result.reason
    assert result.error <= BOUND[result.bound]


# MoE families whose size lies in sub-configs: Qwen3.5-MoE's and Llama 4's text_config beside a vision_config,
# DBRX's attn_config and ffn_config (whose defaults also lack fields, `models._FIXES`); LFM2-MoE's layer pattern;
# LongCat-Flash, which counts its layers in num_layers (it was built with 1 layer of the 3 asked for)
@pytest.mark.parametrize("family", ["qwen3_5_moe", "llama4", "dbrx", "lfm2_moe", "longcat_flash"])
def test_moe_families_with_config_quirks_build_tiny_and_convert(family):
    model = build(family)
    assert sum(p.numel() for p in model.parameters()) < MAX_PARAMETERS / 10
    assert any(type(m).__name__.endswith("Experts") for m in model.modules())  # still a mixture of experts
    result = run_family(family)
    assert result.status == CONVERTED and result.converted == result.layers == 3, result.reason
    assert result.error <= BOUND[result.bound]


@pytest.mark.parametrize("family", ["phi", "openai-gpt"])
def test_a_wrong_inverse_is_a_mismatch(family, monkeypatch):
    """The comparison can fail: an undo off by 1e-3 lands far above the bound, for the new forms too."""
    original = Step.undo
    monkeypatch.setattr(Step, "undo", lambda self, x, out: original(self, x, out) * (1 + 1e-3))
    assert run_family(family).status == MISMATCH


# bfloat16 weights, and float32 weights under bfloat16 autocast: exact streams, so every gradient equals the
# reference's bit for bit (the three layer forms)
@pytest.mark.parametrize("precision", ["bfloat16", "bf16 autocast"])
@pytest.mark.parametrize("family", ["mixtral", "phi", "openai-gpt"])
def test_sample_is_bit_for_bit_in_16_bits(family, precision):
    result = run_family(family, precision=precision)
    assert result.status == CONVERTED and result.bound == BIT_FOR_BIT, result.reason
    assert result.error == 0


def test_a_wrong_exact_inverse_is_a_mismatch(wrong_undo):
    """The bit-for-bit comparison can fail: an integer undo off by 1e-3 (relative) is a mismatch."""
    assert run_family("mixtral", precision="bfloat16").status == MISMATCH


def test_a_stack_the_loss_does_not_use_is_no_mismatch():
    """BLT's entropy patcher (3 layers) converts, but only picks patch boundaries: no gradient reaches it, and no
    backward runs through it. The other 4 layers must all be rebuilt (it builds in bfloat16, not float64)."""
    result = run_family("blt", precision="bfloat16")
    assert result.status == CONVERTED and result.converted == 7 and result.error == 0, result.reason


def test_an_output_the_model_reads_itself_ends_a_run():
    """Inkling2 stacks the input of every sixth layer into block states that later layers read: with 8 layers, the
    output of layer 5 must be a hidden state, not packed streams (its training step crashed on them before). It
    runs under autocast only (its float64 and bfloat16 models fail in transformers itself)."""
    result = run_family("inkling2_text", layers=8, precision="bf16 autocast")
    assert result.status == CONVERTED and result.converted == 8, result.reason
    assert result.layer_error == 0  # (the block states' gradient is summed in another order: see zoo.py)


@pytest.mark.parametrize("family", ["glm_moe_dsa", "hy_v4", "zaya", "rwkv"])
def test_layers_returning_state_convert_whole_stacks(family):
    """GLM-MoE-DSA and HY-V4 hand sparse attention's top-k indices from layer to layer, Zaya its router states
    (only their last layer converted before); RWKV's layers return their recurrent state, which generate() reads
    (it failed converted).
    Every layer converts with the reference's gradients, computes the original model with max_run=1, and
    generates its tokens; in bfloat16, bit for bit."""
    result = run_family(family)
    assert result.status == CONVERTED and result.converted == result.layers == 3, result.reason
    assert result.error <= BOUND[result.bound] and result.generate == GENERATE_OUTCOMES[2], result.generate
    result = run_family(family, precision="bfloat16")
    assert result.status == CONVERTED and result.bound == BIT_FOR_BIT and result.error == 0, result.reason


@pytest.mark.parametrize("family", ["gpt_neox_japanese", "xlnet"])
def test_layers_testing_a_childs_none_output_convert(family):
    """GPT-NeoX-Japanese's layer adds its attention's bias `if attn_bias is not None`, XLNet's runs its FFN on the
    query stream `if output_g is not None`; both are None here, and the layers are traced with them None (1 of 3
    converted before, XLNet's crashed in training)."""
    result = run_family(family)
    assert result.status == CONVERTED and result.converted == result.layers == 3, result.reason
    assert result.error <= BOUND[result.bound] and max(result.original_error.values()) <= 1e-5


# families whose default configs name sizes otherwise (Whisper's and PLBart's decoder_attention_heads), refuse a
# field (ProphetNet's num_hidden_layers, XLNet's max_position_embeddings), or need fields set (X-MOD's language);
# CPM-Ant embeds prompt tokens beyond its vocabulary: none of them was built before
@pytest.mark.parametrize("family", ["whisper", "plbart", "prophetnet", "xmod", "cpmant"])
def test_families_with_config_quirks_build_tiny_and_convert(family):
    result = run_family(family)
    assert result.status == CONVERTED and result.converted == result.layers, result.reason
    assert result.error <= BOUND[result.bound] and result.generate == GENERATE_OUTCOMES[2]


@pytest.mark.slow
@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("family", causal_lm_families())
def test_zoo(family, precision):
    torch.manual_seed(0)
    check(run_family(family, precision=precision))


def test_a_rewrite_that_changes_the_model_is_a_mismatch(monkeypatch):
    """The comparison with the unconverted model can fail where the gradient comparison cannot: branch outputs
    scaled by 1 + 1e-3 in both a step and its undo (the inverse still exact, the model no longer the original)."""
    apply, undo = Step.apply, Step.undo
    monkeypatch.setattr(Step, "apply", lambda self, state, out: apply(self, state, out * (1 + 1e-3)))
    monkeypatch.setattr(Step, "undo", lambda self, state, out: undo(self, state, out * (1 + 1e-3)))
    result = run_family("mixtral")
    assert result.status == MISMATCH and "max_run=1" in result.reason, result.reason
