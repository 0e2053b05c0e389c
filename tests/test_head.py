"""The chunked LM head and loss (revcompile/runtime/head.py) and optimizer-in-backward (revcompile/optim.py).

Reference: the same converted model with head="original" (Hugging Face's lm_head and ForCausalLMLoss), the layers
run under disable_inversion() in both, so the head is the only difference. In fp64 the reference loss is
ForCausalLMLoss without its `.float()` (which would round fp64 logits to fp32): `loss_fp64` below.
Tolerances from measured differences (5 seeds x 3 families x both normalisations): fp32 worst 2.0e-7 (loss) and
5.8e-7 (gradients), bound 1e-5; fp64 worst 3.7e-16 and 2.9e-16, bound 1e-10. The Trainer (1e-5) and
optimizer-in-backward (1e-6) bounds are the fp32 ones, not yet derived from a noise measurement over seeds.
"""

import importlib.machinery
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import revcompile
from conftest import make_model, rel_err, token_batch
from revcompile.measure import hf_checkpointing
from revcompile.runtime import head as head_module
from revcompile.runtime.head import ChunkedHeadModel, check_fused_kernel, chunked_cross_entropy

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
# gemma2's softcap is small because random-init logits are (about 0.2): the tanh must matter
FAMILIES = {"mixtral": {}, "qwen3_moe": dict(tie_word_embeddings=True), "gemma2": dict(final_logit_softcapping=0.1)}


def loss_fp64(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, shift_labels=None, **kwargs):
    """transformers' ForCausalLMLoss in the logits' own dtype (it upcasts with .float(), rounding fp64 to fp32)."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    loss = F.cross_entropy(logits.reshape(-1, vocab_size), shift_labels.reshape(-1), ignore_index=ignore_index,
                           reduction="mean" if num_items_in_batch is None else "sum")
    return loss if num_items_in_batch is None else loss / num_items_in_batch


def converted(name, dtype, head, seed=0, **overrides):
    model = make_model(name, dtype, layers=2, seed=seed, **{**FAMILIES[name], **overrides})
    revcompile.make_reversible(model, head=head, head_chunk_tokens=5)  # 5: several chunks, the last one short
    if head == "original" and dtype == torch.float64:
        model.loss_function = loss_fp64
    return model


def padded_batch(model, seed=1):
    """Two sequences of 12, the first padded by 3 (mask 0, label -100), a few more labels ignored. (Right padding:
    left padding makes Hugging Face's fp64 eager attention NaN on the padded sequence, unconverted too.)"""
    ids = token_batch(model, batch=2, seq=12, seed=seed)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[1, 5:7] = -100
    return ids, mask, labels


def step(model, **kwargs):
    model.zero_grad(set_to_none=True)
    with revcompile.disable_inversion():
        out = model(**kwargs)
        out.loss.backward()
    return out, {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_chunked_head_equals_hf_loss_and_gradients(name, dtype):
    """Padding, ignored labels, the mean over counted tokens and num_items_in_batch (the Trainer's gradient
    accumulation), on mixtral, qwen3_moe with tied embeddings and gemma2 with final logit softcapping."""
    chunked, original = converted(name, dtype, "chunked"), converted(name, dtype, "original")
    ids, mask, labels = padded_batch(chunked)
    for items in (None, torch.tensor(13)):
        kwargs = dict(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=items)
        out, grads = step(chunked, **kwargs)
        ref, ref_grads = step(original, **kwargs)
        assert out.logits is None and ref.logits is not None  # the logits never existed
        assert rel_err(out.loss.detach(), ref.loss.detach()) < TOL[dtype]
        assert set(grads) == set(ref_grads)
        worst = max(ref_grads, key=lambda n: rel_err(grads[n], ref_grads[n]))
        assert rel_err(grads[worst], ref_grads[worst]) < TOL[dtype], worst
    if name == "qwen3_moe":  # tied: one parameter, its gradient the head's plus the embedding's
        assert chunked.lm_head.weight is chunked.model.embed_tokens.weight
    if name == "gemma2":
        assert chunked._revcompile_plan.head == "chunked (softcap 0.1)"


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_resized_embeddings_train_through_the_chunked_head(tied):
    """`resize_token_embeddings` after conversion (new special tokens) replaces an untied lm_head by a new Linear,
    which returned full logits the loss never saw (a RuntimeError); the chunked head now follows the new one. Loss
    and gradients equal head="original"'s, a new token among the labels, within the fp64 tolerance."""
    models = [converted("mixtral", torch.float64, head, tie_word_embeddings=tied) for head in ("chunked", "original")]
    for model in models:
        torch.manual_seed(5)
        model.resize_token_embeddings(model.config.vocab_size + 8, mean_resizing=False)
    ids, mask, labels = padded_batch(models[0])
    labels[0, 2] = ids[1, 4] = models[0].config.vocab_size - 1
    (out, grads), (ref, ref_grads) = [step(m, input_ids=ids, attention_mask=mask, labels=labels) for m in models]
    assert models[0].lm_head.weight.shape[0] == models[0].config.vocab_size
    assert rel_err(out.loss.detach(), ref.loss.detach()) < TOL[torch.float64]
    assert max(rel_err(grads[n], ref_grads[n]) for n in ref_grads) < TOL[torch.float64]


def test_an_adapter_on_the_lm_head_after_conversion_is_refused():
    """PEFT's LoRA on lm_head, added after conversion, wraps the chunked Linear: the chunked loss used the base
    weight alone, and the adapter trained on nothing, silently (loss 4.93 against 5.10). Now a clear error; converted
    after get_peft_model, the model keeps its own head (the head is not a Linear then)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(revcompile.make_reversible(make_model("mixtral", layers=2)),
                           LoraConfig(target_modules=["lm_head", "q_proj"], r=4))
    ids = token_batch(model)
    with pytest.raises(revcompile.RevcompileError, match="head='original'"):
        model(ids, labels=ids)
    model = revcompile.make_reversible(get_peft_model(make_model("mixtral", layers=2),
                                                      LoraConfig(target_modules=["lm_head", "q_proj"], r=4)))
    assert revcompile.analyze(model).head.startswith("original")
    model(ids, labels=ids).loss.backward()
    assert model.base_model.model.lm_head.lora_A["default"].weight.grad is not None


def test_a_loss_function_set_after_conversion_is_used():
    """A loss_function set on the model after conversion was silently ignored in calls with labels (the chunked
    loss ran instead); it now gets the full logits, with a warning that the chunked head is bypassed. (One set
    before conversion keeps the original head.) Twice ForCausalLMLoss gives twice the chunked loss (fp64; HF's loss
    rounds to fp32: 2.6e-8 measured, bound 1e-6)."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    model = revcompile.make_reversible(make_model("mixtral", layers=2))
    ids = token_batch(model)
    chunked = model(ids, labels=ids).loss
    model.loss_function = lambda *args, **kwargs: 2 * ForCausalLMLoss(*args, **kwargs)
    with pytest.warns(UserWarning, match="chunked head is bypassed"):
        doubled = model(ids, labels=ids).loss
    assert abs(float(doubled / chunked) - 2) < 1e-6


def test_softcap_and_shift_matter():
    """The comparison above can fail: the loss without the softcap, or with unshifted labels, is off by far more
    than its tolerance (near-uniform random-init logits keep any loss near log(vocab), hence 1e-4)."""
    model = converted("gemma2", torch.float64, "chunked")
    ids, mask, labels = padded_batch(model)
    with torch.no_grad():
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        ref = loss_fp64(torch.tanh(model.lm_head(hidden) / 0.1) * 0.1, labels, model.config.vocab_size)
    weight = model.lm_head.weight
    assert rel_err(chunked_cross_entropy(hidden, weight, None, labels, softcap=0.1, chunk_tokens=5), ref) < 1e-12
    assert rel_err(chunked_cross_entropy(hidden, weight, None, labels, chunk_tokens=5), ref) > 1e-4
    unshifted = chunked_cross_entropy(hidden, weight, None, labels, shift_labels=labels, softcap=0.1, chunk_tokens=5)
    assert rel_err(unshifted, ref) > 1e-4


def test_chunked_cross_entropy_bias_ignore_and_all_ignored():
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(50, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (3, 7))
    labels[1, 2:5] = -100
    loss = chunked_cross_entropy(hidden, weight, bias, labels, softcap=5.0, chunk_tokens=4)
    grads = torch.autograd.grad(loss, (hidden, weight, bias))
    ref = loss_fp64(torch.tanh(F.linear(hidden, weight, bias) / 5) * 5, labels, 50)
    ref_grads = torch.autograd.grad(ref, (hidden, weight, bias))
    assert rel_err(loss, ref) < 1e-12
    assert all(rel_err(g, r) < 1e-12 for g, r in zip(grads, ref_grads))
    ignored = torch.full_like(labels, -100)  # as F.cross_entropy's mean over no token: NaN
    assert math.isnan(float(chunked_cross_entropy(hidden, weight, bias, ignored)))


def test_head_gradients_scale_in_place_once():
    """Backward scales the gradients forward computed by the incoming gradient (in place: no second weight-sized
    buffer); a second backward through the same graph is refused instead of scaling them twice."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(30, 8, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 30, (2, 5))
    loss = chunked_cross_entropy(hidden, weight, None, labels, chunk_tokens=3)
    ref = loss_fp64(F.linear(hidden, weight), labels, 30)
    grads = torch.autograd.grad(0.25 * loss, (hidden, weight), retain_graph=True)
    ref_grads = torch.autograd.grad(0.25 * ref, (hidden, weight))
    assert all(rel_err(g, r) < 1e-12 for g, r in zip(grads, ref_grads))
    with pytest.raises(revcompile.RevcompileError, match="retain_graph"):
        torch.autograd.grad(loss, (hidden, weight))


def test_logits_without_labels_logits_to_keep_and_no_grad():
    chunked, original = converted("mixtral", torch.float64, "chunked"), converted("mixtral", torch.float64, "original")
    ids, mask, labels = padded_batch(chunked)
    assert torch.equal(chunked(ids).logits, original(ids).logits)
    assert torch.equal(chunked(ids, logits_to_keep=1).logits, original(ids, logits_to_keep=1).logits)
    with torch.no_grad():  # evaluation with labels keeps the logits (Trainer's prediction_step)
        out, ref = chunked(ids, labels=labels), original(ids, labels=labels)
        assert torch.equal(out.logits, ref.logits) and rel_err(out.loss, ref.loss) < 1e-6  # (HF's fp32 loss)
    # logits_to_keep with labels: the kept positions' shifted labels, as ForCausalLMLoss wants them
    kept = dict(input_ids=ids, labels=labels, logits_to_keep=4, shift_labels=labels[:, -4:])
    out, grads = step(chunked, **kept)
    ref, ref_grads = step(original, **kept)
    assert rel_err(out.loss.detach(), ref.loss.detach()) < TOL[torch.float64]
    assert max(rel_err(grads[n], ref_grads[n]) for n in ref_grads) < TOL[torch.float64]


def test_undo_restores_the_head_and_options_are_checked():
    model = make_model("mixtral", torch.float32, layers=2)
    classes, keys = (type(model), type(model.lm_head)), list(model.state_dict())
    ids = token_batch(model)
    before = model(ids).logits.detach()
    revcompile.make_reversible(model)
    assert isinstance(model, ChunkedHeadModel) and model._revcompile_plan.head == "chunked"
    assert type(model).__name__ == "MixtralForCausalLM"  # what save_pretrained writes into `architectures`
    revcompile.undo(model)
    assert (type(model), type(model.lm_head)) == classes and list(model.state_dict()) == keys
    assert not hasattr(model.lm_head, "_revcompile_head") and torch.equal(model(ids).logits, before)
    with pytest.raises(revcompile.RevcompileError, match="head must be one of"):
        revcompile.make_reversible(model, head="fused")
    assert type(model) is classes[0]
    plain = revcompile.make_reversible(make_model("plain", torch.float32))
    assert plain._revcompile_plan.head.startswith("original (not a Hugging Face causal LM")


def test_a_model_computing_its_own_loss_keeps_its_head():
    """BART's decoder-only class calls CrossEntropyLoss on the logits itself, not `self.loss_function`: the probe with
    labels sees the loss function unused, so the head stays as it is (before, its training step crashed on the
    placeholder logits) and the loss is the model's own."""
    from revcompile.zoo import build

    model = build("bart", 2, 0)
    ids = token_batch(model)
    revcompile.make_reversible(model)
    assert model._revcompile_plan.head.startswith("original (its forward computes the loss itself")
    assert "_loss_function" not in model.__dict__  # the probe's spy is gone
    model.train()
    torch.manual_seed(0)  # the same dropout masks in both calls
    loss = model(ids, labels=ids).loss
    loss.backward()
    torch.manual_seed(0)
    with revcompile.disable_inversion():
        reference = model(ids, labels=ids).loss
    assert torch.isfinite(loss) and rel_err(loss, reference) < 1e-10


def test_chunked_head_alone_for_a_baseline():
    """chunked_head on an unconverted model (HF checkpointing + chunked loss in bench/maxbatch.py)."""
    model, reference = make_model("mixtral", torch.float64, layers=2), make_model("mixtral", torch.float64, layers=2)
    reference.loss_function = loss_fp64
    revcompile.chunked_head(model, chunk_tokens=5)
    hf_checkpointing(model)
    model.train()
    ids, mask, labels = padded_batch(model)
    out, grads = step(model, input_ids=ids, attention_mask=mask, labels=labels)
    ref, ref_grads = step(reference, input_ids=ids, attention_mask=mask, labels=labels)
    assert rel_err(out.loss.detach(), ref.loss.detach()) < TOL[torch.float64]
    assert max(rel_err(grads[n], ref_grads[n]) for n in ref_grads) < TOL[torch.float64]
    revcompile.undo(model)
    assert type(model).__name__ == "MixtralForCausalLM"


def test_trainer_with_gradient_accumulation_unchanged(tmp_path):
    """Trainer, 2 accumulation steps over padded batches (num_items_in_batch normalises): same logged losses and
    same weights after training with the chunked head as with the original one."""
    from transformers import Trainer, TrainingArguments

    runs = {}
    for head in ("chunked", "original"):
        model = converted("mixtral", torch.float32, head)
        model.config.use_cache = False
        rows = token_batch(model, batch=8, seq=12, seed=3)
        dataset = [{"input_ids": r, "labels": torch.where(torch.arange(12) < i, -100, r)} for i, r in enumerate(rows)]
        args = TrainingArguments(output_dir=str(tmp_path / head), max_steps=3, per_device_train_batch_size=2,
                                 gradient_accumulation_steps=2, learning_rate=1e-3, logging_steps=1, report_to=[],
                                 use_cpu=True, save_strategy="no", seed=0, data_seed=0)
        trainer = Trainer(model=model, args=args, train_dataset=dataset)
        trainer.train()
        runs[head] = ([h["loss"] for h in trainer.state.log_history if "loss" in h],
                      torch.cat([p.detach().flatten() for p in model.parameters()]))
    (losses, weights), (ref_losses, ref_weights) = runs["chunked"], runs["original"]
    assert len(losses) == 3 and max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses)) < 1e-5
    assert rel_err(weights, ref_weights) < 1e-5


def test_optimizer_in_backward_trains_like_a_normal_step():
    """3 AdamW steps with a decaying learning rate: stepped inside backward (one optimizer per parameter, the rate
    set by `set_lr`) against optimizer.step() after it, on a converted model (reversible backward, chunked head,
    tied weights); no gradient is left allocated."""
    models = [converted("qwen3_moe", torch.float32, "chunked") for _ in range(2)]
    opt = torch.optim.AdamW(models[0].parameters(), lr=1e-2, weight_decay=0.1)
    in_backward = revcompile.optimizer_in_backward(models[1], torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
    for i in range(3):
        for group in opt.param_groups:
            group["lr"] = 1e-2 / (i + 1)
        in_backward.set_lr(1e-2 / (i + 1))
        ids = token_batch(models[0], batch=2, seq=12, seed=i)
        models[0](ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        models[1](ids, labels=ids).loss.backward()
        assert all(p.grad is None for p in models[1].parameters())
    start = converted("qwen3_moe", torch.float32, "chunked")
    moved = max(rel_err(p, q) for p, q in zip(models[0].parameters(), start.parameters()))
    worst = max(rel_err(p, q) for p, q in zip(models[1].parameters(), models[0].parameters()))
    assert moved > 1e-3 and worst < 1e-6
    assert len(in_backward.state_dict()) == len(list(models[1].parameters()))
    in_backward.remove()
    ids = token_batch(models[1], batch=2, seq=12)
    models[1](ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in models[1].parameters())


def fake_fused_kernels(monkeypatch):
    """Stand-ins for liger_kernel and cut_cross_entropy (Triton, CUDA only), on the CPU: each computes what the
    real kernel computes from the arguments it is given (the loss of softcap(linear) over non-ignored targets, with
    the requested reduction), so a wrong argument gives a wrong loss. Returns the precision options each call got."""
    calls = []

    def loss(e, c, bias, targets, ignore_index, softcap, reduction):
        logits = F.linear(e, c, bias)
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)

    def liger(input, weight, target, bias=None, ce_weight=None, ignore_index=-100, lse_square_scale=0.0,
              label_smoothing=0.0, reduction="mean", softcap=None, accum_dtype=None, **kwargs):
        calls.append(("liger", accum_dtype))
        return loss(input, weight, bias, target, ignore_index, softcap, reduction)

    def cce(e, c, targets, ignore_index=-100, softcap=None, reduction="mean", shift=False, filter_eps="high"):
        calls.append(("cce", filter_eps, shift))
        return loss(e, c, None, targets, ignore_index, softcap, reduction)

    for name, attrs in {"liger_kernel": {}, "liger_kernel.transformers": {},
                        "liger_kernel.transformers.functional": {"liger_fused_linear_cross_entropy": liger},
                        "cut_cross_entropy": {"linear_cross_entropy": cce}}.items():
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        module.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(head_module, "FUSED_KERNEL_DEVICES", ("cuda", "cpu"))
    return calls


@pytest.mark.parametrize("kernel", ["liger", "cce"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_fused_kernels_get_hugging_face_semantics(monkeypatch, kernel, name):
    """head="liger" / "cce" hand the kernel the shifted, flattened targets, ignore_index, softcap and a sum, and
    divide as ForCausalLMLoss does (counted tokens or num_items_in_batch): loss and gradients equal the original
    head's in fp64 (bound as for the chunked head). The kernels themselves (CUDA) are measured by bench/heads.py."""
    calls = fake_fused_kernels(monkeypatch)
    fused, original = converted(name, torch.float64, kernel), converted(name, torch.float64, "original")
    ids, mask, labels = padded_batch(fused)
    for items in (None, torch.tensor(13)):
        kwargs = dict(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=items)
        out, grads = step(fused, **kwargs)
        ref, ref_grads = step(original, **kwargs)
        assert out.logits is None and rel_err(out.loss.detach(), ref.loss.detach()) < TOL[torch.float64]
        assert max(rel_err(grads[n], ref_grads[n]) for n in ref_grads) < TOL[torch.float64]
    # the precision options: fp32-or-wider weight-gradient accumulation (Liger), no gradient filtering (CCE)
    assert calls == [("liger", torch.float64)] * 2 if kernel == "liger" else calls == [("cce", None, False)] * 2
    assert fused._revcompile_plan.head == (f"{kernel} (softcap 0.1)" if name == "gemma2" else kernel)


def test_fused_kernels_refuse_what_they_cannot_run(monkeypatch):
    """A missing package (conversion), a bias for CCE (conversion) and a CPU call (the Triton kernels run on CUDA
    only) are RevcompileErrors saying what to do, never a silent fallback."""
    lm_head = torch.nn.Linear(8, 16)
    for kernel, package in (("liger", "liger_kernel"), ("cce", "cut_cross_entropy")):
        if importlib.util.find_spec(package) is None:
            with pytest.raises(revcompile.RevcompileError, match=r"pip install 'revcompile\[gpu\]'"):
                check_fused_kernel(kernel, lm_head)
    fake_fused_kernels(monkeypatch)
    with pytest.raises(revcompile.RevcompileError, match="takes no bias"):
        check_fused_kernel("cce", lm_head)
    check_fused_kernel("liger", lm_head)
    monkeypatch.setattr(head_module, "FUSED_KERNEL_DEVICES", ("cuda",))
    model = converted("mixtral", torch.float32, "liger")
    ids = token_batch(model)
    with pytest.raises(revcompile.RevcompileError, match="on CUDA only.*head='chunked'"):
        model(ids, labels=ids)
    with pytest.raises(revcompile.RevcompileError, match="kernel must be"):
        revcompile.chunked_head(make_model("mixtral", torch.float32, layers=2), kernel="original")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused kernels and the 16-bit weight-gradient GEMM "
                    "run on CUDA only (bench/device_session.sh runs this on a lent GPU)")
@pytest.mark.parametrize("kernel", ["chunked", "liger", "cce"])
def test_head_kernels_on_cuda_are_as_precise_as_hugging_face(kernel):
    """bf16 weights on CUDA, 4,096 tokens, vocab 32,000: each kernel's loss and gradients are no further from fp64
    than Hugging Face's own bf16 head and loss (twice its error, or 1e-6, at most)."""
    if kernel != "chunked" and importlib.util.find_spec(head_module.FUSED_KERNELS[kernel].replace("-", "_")) is None:
        pytest.skip(f"{head_module.FUSED_KERNELS[kernel]} is not installed")
    from transformers.loss.loss_utils import ForCausalLMLoss

    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 2048, 512, generator=generator, dtype=torch.float64)
    weight = torch.randn(32000, 512, generator=generator, dtype=torch.float64) * 0.02
    labels = torch.randint(0, 32000, (2, 2048), generator=generator)
    labels[:, :100] = -100

    def run(loss_of, dtype, device):
        h = hidden.to(device, dtype, copy=True).requires_grad_()
        w = weight.to(device, dtype, copy=True).requires_grad_()
        loss = loss_of(h, w, labels.to(device))
        loss.backward()
        return [t.detach().double().cpu() for t in (loss, h.grad, w.grad)]

    reference = run(lambda h, w, y: chunked_cross_entropy(h, w, None, y), torch.float64, "cpu")
    hf = run(lambda h, w, y: ForCausalLMLoss(F.linear(h, w), y, 32000), torch.bfloat16, "cuda")
    got = run(lambda h, w, y: chunked_cross_entropy(h, w, None, y, kernel=kernel), torch.bfloat16, "cuda")
    for name, g, h, r in zip(("loss", "grad hidden", "grad weight"), got, hf, reference):
        assert rel_err(g, r) <= max(2 * rel_err(h, r), 1e-6), name
