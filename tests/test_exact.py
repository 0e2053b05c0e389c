"""Exact streams: backward rebuilds every layer's input bit for bit, in bf16, fp16, fp32 and under autocast.

`revcompile.check` runs one step with inversion and one under `disable_inversion()` (the same integer arithmetic
with ordinary autograd); `report.exact` is True only when every rebuilt input equals the forward's bits.
"""

import warnings

import pytest
import torch

import revcompile
from conftest import loss_and_grads, make_model, rel_err, token_batch
from revcompile.errors import RevcompileError
from revcompile.runtime.streams import BITS_OF, FixedPoint

FAMILIES = ("olmoe", "qwen3_moe", "mixtral", "deepseek_v3")
PRECISIONS = {"fp32": (torch.float32, None), "bf16": (torch.bfloat16, None),
              "bf16-autocast": (torch.float32, torch.bfloat16), "fp16": (torch.float16, None)}
# NOTE: exact streams rebuild every input bit for bit and the reference sums gradients in the reversible backward's
# order (runtime/reference.py), so the gradients are bit-identical: measured 0 over these 4 families x symplectic,
# midpoint, leapfrog x 4 precisions, 4 layers, batch 2 x 32, seeds 0-2, 1 and 2 threads (288 runs). Not a tolerance.


def check(model, autocast=None, seq=32):
    return revcompile.check(model, token_batch(model, seq=seq), autocast=autocast)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("family", FAMILIES)
def test_rebuilt_inputs_are_bit_exact(family, precision):
    dtype, autocast = PRECISIONS[precision]
    model = revcompile.make_reversible(make_model(family, dtype, layers=4, use_cache=False), exact=True)
    report = check(model, autocast)
    assert report.exact, report
    assert report.worst_grad_error == 0, report


@pytest.mark.parametrize("precision", PRECISIONS)
def test_exact_by_default_where_the_run_computes_in_16_bits(precision):
    """exact=None: integer streams for bf16/fp16 weights and under autocast; float streams in plain fp32."""
    dtype, autocast = PRECISIONS[precision]
    model = revcompile.make_reversible(make_model("olmoe", dtype, layers=2, use_cache=False))
    assert check(model, autocast).exact == (precision != "fp32")


def test_float_streams_are_not_exact_in_bf16():
    """The property above can fail: the same model on float streams loses bits at every layer."""
    model = revcompile.make_reversible(make_model("mixtral", torch.bfloat16, layers=4, use_cache=False), exact=False)
    report = check(model)
    assert not report.exact and report.worst_input_error > 1e-4


@pytest.mark.parametrize("scheme", ["midpoint", "leapfrog"])
def test_integrators_are_exact_too(scheme):
    """Their constants (2h = 1, 2 and -1 for the leapfrog) are integers: integer streams undo them exactly."""
    model = revcompile.make_reversible(make_model("olmoe", torch.bfloat16, layers=4, use_cache=False), scheme)
    report = check(model)
    assert report.exact, report
    assert report.worst_grad_error == 0, report


def test_forward_runs_the_recompute_slices():
    """DeepSeek-V3's router computes in fp32: sliced recompute of an unsliced forward differed by ~1e-7; forward now
    runs the same slices, so the inputs are rebuilt exactly even in fp32 with 4 slices."""
    model = revcompile.make_reversible(make_model("deepseek_v3", torch.float32, layers=4, use_cache=False),
                                       recompute_chunks=4, exact=True)
    assert check(model).exact


def test_schemes_that_scale_streams_stay_float():
    model = revcompile.make_reversible(make_model("mixtral", layers=2), "meft1")
    assert not any(layer._revcompile.exact for layer in revcompile.converted_layers(model))
    with pytest.raises(RevcompileError, match="exact=True is not available.*multiplies a stream by 0.1"):
        revcompile.make_reversible(make_model("mixtral", layers=2), "meft1", exact=True)
    with pytest.raises(RevcompileError, match="exact_headroom must be"):
        revcompile.make_reversible(make_model("mixtral", layers=2), exact_headroom=40)


def test_streams_travel_in_twice_the_model_bytes():
    """bf16 model: int32 streams; q, p and the run input h0 packed as one 4-byte tensor (2x the bf16 streams)."""
    model = revcompile.make_reversible(make_model("olmoe", torch.bfloat16, layers=2, use_cache=False))
    model.train()
    seen = []
    model.model.layers[1].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    model(token_batch(model), labels=token_batch(model)).loss.backward()
    packed = seen[0]
    assert packed.dtype == torch.float32 and packed.shape[0] == 3
    assert packed.element_size() == 2 * torch.finfo(torch.bfloat16).bits // 8


def plain(dtype, embed_scale=1.0, norm_scale=1.0, **options):
    """A converted plain-PyTorch MoE whose values are rescaled after conversion (the analysis probes ordinary ones)."""
    model = revcompile.make_reversible(make_model("plain", dtype, layers=4), exact=True, **options)
    with torch.no_grad():
        model.embed.weight.mul_(embed_scale)
        for module in model.modules():  # norms and biases set every branch output's scale
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.mul_(norm_scale)
            if isinstance(module, (torch.nn.LayerNorm, torch.nn.Linear)) and module.bias is not None:
                module.bias.mul_(norm_scale)
    return model


def plain_check(model):
    return revcompile.check(model, token_batch(model, seq=16), loss_fn=lambda m, ids: m(ids).float().pow(2).mean())


def test_massive_activations_are_exact():
    """A residual stream with |x| ~ 1e4 in a few channels (as trained LLMs have) next to values ~1."""
    model = plain(torch.bfloat16)
    with torch.no_grad():
        model.embed.weight[:, :3] = 1e4
    report = plain_check(model)
    assert report.exact and report.worst_grad_error == 0, report


def test_tiny_values_are_exact():
    """Values ~1e-20 everywhere: the grid follows the run's input down (a shift of about 80 bits)."""
    model = plain(torch.float32, embed_scale=1e-20, norm_scale=1e-20)
    report = plain_check(model)
    assert report.exact and report.worst_grad_error == 0, report


def test_a_stream_that_outgrows_the_grid_raises_never_wraps():
    """No room above the input's largest value: the first branch output that adds to it must raise, in the
    reversible forward, in the reference and in eval, naming the option that gives more room; a run that comes
    within 16x of the range warns first."""
    model = plain(torch.bfloat16, exact_headroom=0)
    ids = token_batch(model, seq=16)
    model.train()
    with pytest.raises(RevcompileError, match="exact_headroom=4"):
        model(ids)
    with revcompile.disable_inversion(), pytest.raises(RevcompileError, match="exact_headroom=4"):
        model(ids)
    with torch.no_grad(), pytest.raises(RevcompileError, match="exact_headroom"):
        model.eval()(ids)
    close = plain(torch.bfloat16, exact_headroom=4)  # (measured: headroom 2 and 4 warn, 6 and more do not)
    with pytest.warns(UserWarning, match=r"within 16x of the integer range.*exact_headroom=8"):
        close.train()(ids).float().sum().backward()
    roomy = plain(torch.bfloat16, exact_headroom=8)
    roomy.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 8 bits of room: no warning
        roomy(ids).float().sum().backward()


def test_a_branch_output_that_is_not_finite_raises_never_becomes_an_integer():
    """A nan from a branch (the model's own overflow) has no integer: it must raise, not enter the stream as one."""
    model = plain(torch.bfloat16)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    with torch.no_grad():
        norms[1].weight.fill_(float("nan"))  # the second branch's input norm: its output is nan
    with pytest.raises(RevcompileError, match="not finite"):
        model.train()(token_batch(model, seq=16))


def test_eval_runs_the_same_integer_arithmetic():
    """Inference of an exact model gives the training forward's output (the reference's), bit for bit."""
    model = revcompile.make_reversible(make_model("qwen3_moe", torch.bfloat16, layers=3, use_cache=False))
    ids = token_batch(model)
    model.train()
    with torch.no_grad():
        trained = model(ids).logits
    loss, _, _ = loss_and_grads(model, ids, reference=False)
    ref_loss, _, _ = loss_and_grads(model, ids, reference=True)
    assert loss == ref_loss
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, trained)


@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe"])
def test_a_bf16_checkpoint_with_float32_routers_is_exact(family):
    """Loaded in bf16 as `from_pretrained(..., dtype=torch.bfloat16)` loads it (`models.as_loaded`), a DeepSeek-V3 or
    GLM-4-MoE layer keeps its router weight and score-correction bias in float32 beside bf16 experts and attention:
    its streams are still exact, and every gradient is the reference's bit for bit."""
    model = revcompile.make_reversible(make_model(family, torch.bfloat16, layers=3, use_cache=False))
    gate = model.model.layers[1].mlp.gate
    assert gate.weight.dtype == gate.e_score_correction_bias.dtype == torch.float32
    assert model.model.layers[1].mlp.experts.down_proj.dtype == torch.bfloat16
    ids = token_batch(model, seq=16)
    loss, nodes, grads = loss_and_grads(model, ids, reference=False)
    ref_loss, _, ref_grads = loss_and_grads(model, ids, reference=True)
    assert nodes == 3 and loss == ref_loss and grads.keys() == ref_grads.keys()
    assert all(torch.equal(grads[name], ref_grads[name]) for name in ref_grads)


@pytest.mark.parametrize("family, chunks", [("mixtral", None), ("qwen3_moe", 2), ("deepseek_v3", None)])
def test_bf16_with_sdpa_attention_is_exact(family, chunks):
    """With sdpa attention (what `from_pretrained` picks; the tiny configs default to eager), in the model's own
    pieces or recomputed in slices (attention by batch, the MoE by sequence): bit for bit."""
    model = make_model(family, torch.bfloat16, layers=3, use_cache=False, attn_implementation="sdpa")
    assert model.config._attn_implementation == "sdpa"
    model = revcompile.make_reversible(model, recompute_chunks=chunks)
    ids = token_batch(model, seq=16)
    loss, nodes, grads = loss_and_grads(model, ids, reference=False)
    ref_loss, _, ref_grads = loss_and_grads(model, ids, reference=True)
    assert nodes == 3 and loss == ref_loss and grads.keys() == ref_grads.keys()
    assert all(torch.equal(grads[name], ref_grads[name]) for name in ref_grads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_float_bits_travel_unchanged(dtype):
    """A float stream rides in the integer buffer as its bits: nan, inf, -0 and subnormals included."""
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-45, -3.5, 6e4], dtype=dtype)
    h = torch.cat([special, torch.randn(100, dtype=dtype)])
    fmt = FixedPoint.choose(h[8:])
    back = fmt.from_bits(fmt.to_bits(h))
    assert back.dtype == dtype and torch.equal(back.view(BITS_OF[dtype]), h.view(BITS_OF[dtype]))


def test_a_wrong_exact_undo_is_caught(wrong_undo):
    """A wrong undo breaks both properties: the rebuilt inputs and the gradients (bit-identical when right)."""
    model = revcompile.make_reversible(make_model("mixtral", torch.float32, layers=3, use_cache=False), exact=True)
    report = check(model)
    assert not report.exact and report.worst_grad_error > 1e-4


def test_grid_from_the_input():
    h = torch.tensor([0.75, -3.0, 0.001], dtype=torch.bfloat16)
    fmt = FixedPoint.choose(h)
    assert fmt.int_dtype == torch.int32 and fmt.shift == 31 - 16 - 2  # max 3.0 < 2**2
    assert rel_err(fmt.dequantize(fmt.quantize(h)).float(), h.float()) < 2 ** -10
    with pytest.raises(RevcompileError, match="not finite"):
        FixedPoint.choose(torch.tensor([1.0, float("inf")]))


@pytest.mark.parametrize("precision", ["bf16", "bf16-autocast"])
@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_are_bit_identical_at_depth(family, precision):
    """16 layers, the default (exact) streams, the MoE recomputed in 4 slices: every parameter's gradient equals the
    reference's to the bit. Before the reference summed its gradients in the reversible backward's order (slices'
    terms included), bf16 autocast differed by ~3e-3 here."""
    dtype, autocast = PRECISIONS[precision]
    model = revcompile.make_reversible(make_model(family, dtype, layers=16, use_cache=False), recompute_chunks=4)
    ids = token_batch(model, seq=32)
    with torch.autocast("cpu", autocast or torch.bfloat16, enabled=autocast is not None):
        loss, nodes, grads = loss_and_grads(model, ids, reference=False)
        ref_loss, ref_nodes, ref_grads = loss_and_grads(model, ids, reference=True)
    assert nodes == 16 and ref_nodes == 0
    assert torch.equal(loss, ref_loss) and grads.keys() == ref_grads.keys()
    assert all(torch.equal(grads[name], ref_grads[name]) for name in grads)


@pytest.mark.parametrize("dtype, scale, negate, coeffs", [(torch.bfloat16, 1.0, False, ()),
                                                          (torch.float16, 0.3, True, (2,))])
def test_compiled_steps_are_the_eager_integers(dtype, scale, negate, coeffs):
    """compile=True's fused step and undo give the eager kernels' integers and range bound bit for bit (a power-of-two
    scale in bf16, and a leapfrog-like step: negated target, a mixed stream, a scale that rounds in float32), and a
    branch output that is not finite still flags the run."""
    from revcompile.runtime.streams import compiled_steps, step_integers, undo_integers

    generator = torch.Generator().manual_seed(0)
    h = (3 * torch.randn(2, 24, 40, generator=generator)).to(dtype)
    fmt = FixedPoint.choose(h)
    target, mixed = fmt.quantize(h), fmt.quantize(torch.randn(h.shape, generator=generator).to(dtype))
    out = (5 * torch.randn(h.shape, generator=generator)).to(dtype)
    fused_step, fused_undo = compiled_steps()
    args = (target, out, [mixed] * len(coeffs), coeffs, negate, *fmt.grid(out, scale))
    new, bound = fused_step(*args, fmt.overflow)
    expected_new, expected_bound = step_integers(*args, fmt.overflow)
    assert torch.equal(new, expected_new) and torch.equal(bound, expected_bound) and 0 < float(bound) < fmt.limit
    after = (new, *args[1:])
    assert torch.equal(fused_undo(*after), undo_integers(*after)) and torch.equal(fused_undo(*after), target)
    out[0, 0, 0] = float("nan")
    assert not fused_step(*args, fmt.overflow)[1] < fmt.limit  # (nan compares False: raise_if_overflowed raises)


@pytest.mark.parametrize("precision", ["bf16", "bf16-autocast", "fp32"])
def test_frozen_lower_layers_keep_the_run_exact(precision):
    """Fine-tuning the top of a model (embedding and the first two of four layers frozen): the frozen layers need no
    gradient and run coupled, and the reversible layers above used to go on with float streams instead of the run's
    integers (bf16: loss 3.9e-4 and gradients 1 % off the reference's). They continue the integer streams: loss
    and every gradient equal the reference's bit for bit (fp32 keeps float streams: within the fp32 tolerance)."""
    dtype, autocast = PRECISIONS[precision]
    model = revcompile.make_reversible(make_model("mixtral", dtype, layers=4, use_cache=False))
    model.model.embed_tokens.requires_grad_(False)
    model.model.layers[:2].requires_grad_(False)
    ids = token_batch(model)
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        loss, nodes, grads = loss_and_grads(model, ids, reference=False)
        reference_loss, _, reference = loss_and_grads(model, ids, reference=True)
    assert nodes == 2 and grads.keys() == reference.keys() and len(grads) > 0
    assert all("layers.0." not in name and "layers.1." not in name for name in grads)
    bound = 0.0 if precision != "fp32" else 1e-4
    assert rel_err(loss, reference_loss) <= bound
    assert max(rel_err(grads[n].double(), reference[n].double()) for n in reference) <= bound


@pytest.mark.parametrize("index", [0, 1, 3])
def test_a_layer_left_in_eval_mode_in_training_keeps_the_run_exact(index):
    """A layer in eval mode in training runs coupled with grad, on float carriers of the run's integers: below a
    reversible layer it takes them from the packed integers (it read those bits as floats: a dtype error), above one
    the reversible layer continues the integers and hands their gradient back to the carriers (without that, the
    embedding and the layers below got none). Every gradient equals the reference's bit for bit."""
    model = revcompile.make_reversible(make_model("mixtral", torch.bfloat16, layers=4, use_cache=False))
    model.train()
    model.model.layers[index].eval()
    ids = token_batch(model)
    loss, nodes, grads = loss_and_grads(model, ids, reference=False)
    reference_loss, _, reference = loss_and_grads(model, ids, reference=True)
    assert nodes == 3 and grads.keys() == reference.keys() and "model.embed_tokens.weight" in grads
    assert loss == reference_loss
    assert all(torch.equal(grads[n], reference[n]) for n in reference)
