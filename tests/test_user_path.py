"""A new user's path (issue 14): save and reload a trained converted model, undo that never silently changes a
trained model, Hugging Face checkpointing and use_cache=True, analyze on a converted model, a light import."""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

import revcompile
from conftest import count_reversible_nodes, lm_loss, make_model, token_batch
from revcompile.measure import hf_checkpointing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_KERNELS = dict(attn_implementation="eager", experts_implementation="eager")  # as tiny_config builds them


def train(model, steps: int = 2, lr: float = 1e-2) -> None:
    """A few AdamW steps, so that the weights are trained under the model's scheme."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        lm_loss(model, token_batch(model, seed=step)).backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("scheme", list(revcompile.SCHEMES))
def test_trained_converted_model_reloads_exactly(scheme, tmp_path):
    """save_pretrained -> revcompile.from_pretrained gives the trained function back, bit for bit."""
    model = revcompile.make_reversible(make_model("mixtral", torch.float32, layers=2), scheme)
    train(model)
    model.save_pretrained(tmp_path)
    reloaded = revcompile.from_pretrained(str(tmp_path), **TINY_KERNELS)
    ids = token_batch(model, seed=9)
    model.eval()
    with torch.no_grad():
        out, again = model(ids, labels=ids), reloaded(ids, labels=ids)
    assert torch.equal(out.logits, again.logits) and torch.equal(out.loss, again.loss)
    assert revcompile.analyze(reloaded).applied and len(revcompile.converted_layers(reloaded)) == 2
    if scheme != "fixed_point":  # every other scheme changes the function: its trained weights need it
        with pytest.raises(revcompile.RevcompileError, match="revcompile.from_pretrained"):
            revcompile.undo(reloaded)


def trainer_run(model, out, resume: str | None = None) -> torch.Tensor:
    """4 Trainer steps (a checkpoint every 2), from `resume` if given; every parameter afterwards, flattened."""
    from transformers import Trainer, TrainingArguments

    model.config.use_cache = False
    rows = token_batch(model, batch=8, seq=12, seed=3)
    args = TrainingArguments(output_dir=str(out), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2,
                             logging_steps=1, report_to=[], use_cpu=True, save_strategy="steps", save_steps=2, seed=0,
                             data_seed=0, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in rows]).train(
        resume_from_checkpoint=resume)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_trainer_run_resumes_from_its_checkpoint_exactly(dtype, tmp_path):
    """Preempted and resumed: the model loaded from the checkpoint with revcompile.from_pretrained, then
    `trainer.train(resume_from_checkpoint=...)` (optimizer, schedule and RNG from the checkpoint) ends with the
    weights of the run that was never interrupted, bit for bit.

    NOTE: the Trainer's own reload of the weights (`load_state_dict` of the saved file, strict=False) does not convert
    the saved expert keys back (transformers#48805, open in 5.24): on a model built afresh it leaves every expert
    and router weight as initialised, converted or not; hence from_pretrained first (README, "Resuming").
    """
    from transformers import AutoModelForCausalLM

    make_model("mixtral", torch.float32, layers=2).save_pretrained(tmp_path / "pretrained")
    # (loaded as a user does: a model cast with .to(bf16) would hold its rotary frequencies in bf16 too)
    pretrained = AutoModelForCausalLM.from_pretrained(tmp_path / "pretrained", dtype=dtype, **TINY_KERNELS)
    start = torch.cat([p.detach().flatten() for p in pretrained.parameters()])
    uninterrupted = trainer_run(revcompile.make_reversible(pretrained), tmp_path / "a")
    checkpoint = str(tmp_path / "a" / "checkpoint-2")
    resumed = trainer_run(revcompile.from_pretrained(checkpoint, dtype=dtype, **TINY_KERNELS), tmp_path / "b",
                          checkpoint)
    assert not torch.equal(uninterrupted, start)
    assert torch.equal(resumed, uninterrupted)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_lora_trainer_run_resumes_from_its_checkpoint_exactly(dtype, tmp_path):
    """LoRA (PEFT) on a converted model: the Trainer's own resume loads the adapters into the model the run started
    from (the checkpoint holds only them), and they end as in the uninterrupted run, bit for bit."""
    from peft import LoraConfig, get_peft_model

    def lora():
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
        return revcompile.make_reversible(get_peft_model(make_model("mixtral", dtype, layers=2), config))

    start = torch.cat([p.detach().flatten() for p in lora().parameters()])
    uninterrupted = trainer_run(lora(), tmp_path / "a")
    resumed = trainer_run(lora(), tmp_path / "b", str(tmp_path / "a" / "checkpoint-2"))
    assert not torch.equal(uninterrupted, start)
    assert torch.equal(resumed, uninterrupted)


def test_conversion_options_are_recorded_in_config_json(tmp_path):
    model = make_model("mixtral", torch.float32, layers=3)
    revcompile.make_reversible(model, "meft2", max_run=2, recompute_chunks=2, beta=0.5, rank=4)
    model.save_pretrained(tmp_path)
    record = json.loads((tmp_path / "config.json").read_text())["revcompile"]
    assert record["scheme"] == "meft2" and record["options"] == {"beta": 0.5, "rank": 4}
    assert record["max_run"] == 2 and record["recompute_chunks"] == 2 and record["invert"] is True
    assert record["layers"] == [f"model.layers.{i}" for i in range(3)] and record["not_recorded"] == []
    reloaded = revcompile.from_pretrained(str(tmp_path), **TINY_KERNELS)
    runtimes = [layer._revcompile for layer in revcompile.converted_layers(reloaded)]
    assert [(rt.is_first, rt.is_last) for rt in runtimes] == [(True, False), (False, True), (True, True)]
    assert reloaded.model.layers[0].revcompile_modules.adapter_f.down.out_features == 4


def test_run_options_override_the_recorded_ones_on_reload(tmp_path):
    """A checkpoint converted with one head and slicing reloads with others (a GPU's head="liger" on a CPU, say);
    an option that changes what the model computes cannot be overridden."""
    model = revcompile.make_reversible(make_model("mixtral", torch.float32, layers=2), head="original",
                                       recompute_chunks=2)
    model.save_pretrained(tmp_path)
    as_saved = revcompile.from_pretrained(str(tmp_path), **TINY_KERNELS)
    assert as_saved._revcompile_plan.head.startswith("original")
    reloaded = revcompile.from_pretrained(str(tmp_path), run_options={"head": "chunked", "recompute_chunks": 1},
                                          **TINY_KERNELS)
    assert reloaded._revcompile_plan.head == "chunked"
    assert {split.chunks for layer in revcompile.converted_layers(as_saved)
            for split in layer._revcompile.splits.values()} == {2}
    assert {split.chunks for layer in revcompile.converted_layers(reloaded)
            for split in layer._revcompile.splits.values()} == {1}
    with pytest.raises(revcompile.RevcompileError, match="would change what the saved model computes"):
        revcompile.from_pretrained(str(tmp_path), run_options={"max_run": 1})


def test_from_pretrained_of_an_unconverted_checkpoint_is_a_clear_error(tmp_path):
    make_model("mixtral", torch.float32, layers=2).save_pretrained(tmp_path)
    with pytest.raises(revcompile.RevcompileError, match="records no revcompile conversion"):
        revcompile.from_pretrained(str(tmp_path))


def test_undo_after_training_under_a_function_changing_scheme_needs_force():
    model = revcompile.make_reversible(make_model("mixtral", torch.float32, layers=2))
    train(model)
    with pytest.raises(revcompile.RevcompileError, match="trained under the 'symplectic' scheme.*force=True"):
        revcompile.undo(model)
    assert len(revcompile.converted_layers(model)) == 2  # refused: still converted
    revcompile.undo(model, force=True)
    assert not revcompile.converted_layers(model) and not hasattr(model.config, "revcompile")
    exact = revcompile.make_reversible(make_model("mixtral", torch.float32, layers=2), "fixed_point")
    train(exact)
    revcompile.undo(exact)  # fixed_point keeps the function: the trained weights mean the same without it


def attention_calls_per_step(model) -> int:
    calls = []
    hooks = [layer.self_attn.register_forward_hook(lambda *_: calls.append(1)) for layer in model.model.layers]
    lm_loss(model.train(), token_batch(model)).backward()
    for hook in hooks:
        hook.remove()
    return len(calls)


@pytest.mark.parametrize("api", ["gradient_checkpointing_enable", "activation_checkpointing_enable"])
@pytest.mark.parametrize("order", ["before", "after"])
def test_hf_checkpointing_is_switched_off_on_converted_layers(order, api):
    """A reversible layer runs its attention twice a step (forward, recompute); checkpointed too, 3 times. (Both
    of transformers' names: `activation_checkpointing_enable`, newer, deprecates the other.)"""
    model = make_model("mixtral", torch.float32, layers=2)
    if not hasattr(model, api):
        pytest.skip(f"this transformers has no {api}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        if order == "before":
            getattr(model, api)()
        revcompile.make_reversible(model)
        if order == "after":
            getattr(model, api)()
        assert attention_calls_per_step(model) == 4
    notes = [w for w in caught if "activation checkpointing is switched off" in str(w.message)]
    assert len(notes) == 1
    revcompile.undo(model, force=True)  # the original layers checkpoint again, as asked: forward and recompute
    assert attention_calls_per_step(model) == 4
    hf_checkpointing(model, on=False)
    assert attention_calls_per_step(model) == 2


def test_a_layer_whose_forward_is_replaced_on_the_instance_is_left_alone_and_reported():
    """The class swap cannot reach a layer whose `forward` is an instance attribute: it is left alone and reported
    (before this check the plan counted it converted, and the step failed on a shape mismatch: the layer got its
    run's packed streams). The two layers around it convert, each a run of its own, which computes the original."""
    model, original = (make_model("mixtral", torch.float32, layers=3) for _ in range(2))
    model.model.layers[1].forward = model.model.layers[1].forward  # a bound method, set on the instance
    revcompile.make_reversible(model)
    plan = model._revcompile_plan
    assert [p.layer for p in plan.pairs] == ["model.layers.0", "model.layers.2"]
    assert plan.skipped[0].layer == "model.layers.1" and "del layer.forward" in plan.skipped[0].reason
    ids = token_batch(model)
    loss = lm_loss(model, ids)
    assert count_reversible_nodes(loss) == 2
    assert abs(loss.item() - lm_loss(original, ids).item()) <= 1e-6 * loss.item()


def test_a_model_dispatched_by_accelerate_is_a_clear_error(tmp_path):
    """device_map over several devices or with offloading puts accelerate's hooks on every layer: nothing would
    run reversibly, so make_reversible says so and what to do (it used to convert in name only: 0 reversible
    layers in the step)."""
    from transformers import AutoModelForCausalLM

    make_model("mixtral", torch.float32, layers=2).save_pretrained(tmp_path / "model")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model", device_map=device_map,
                                                 offload_folder=tmp_path / "offload", **TINY_KERNELS)
    with pytest.raises(revcompile.RevcompileError, match="accelerate's hooks.*device_map=None"):
        revcompile.make_reversible(model)


def test_readme_example_runs_without_warnings():
    """HF models default to use_cache=True: the cache is simply not used in training, without a word."""
    model = make_model("mixtral", torch.float32, layers=2)
    ids = token_batch(model)
    assert model.config.use_cache and model.training
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        revcompile.make_reversible(model)
        model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_analyze_on_a_converted_model_returns_the_plan_in_effect():
    model = make_model("mixtral", layers=2)
    assert not revcompile.analyze(model).applied
    revcompile.make_reversible(model)
    plan = revcompile.analyze(model)
    assert plan.applied and [p.layer for p in plan.pairs] == ["model.layers.0", "model.layers.1"]
    assert str(plan).startswith("revcompile plan (applied): 2 pairs")


def test_import_loads_nothing_heavy():
    """`import revcompile` (and so every CLI call) leaves Dynamo, Inductor, transformers and matplotlib unloaded;
    the torch.compile backend is still found, through the package's entry point."""
    code = ("import sys, revcompile, revcompile.cli; "
            "print([m for m in ('torch._dynamo', 'torch._inductor', 'transformers', 'matplotlib') if m in sys.modules])"
            "; import torch._dynamo; print(torch._dynamo.lookup_backend('revcompile').__module__)")
    result = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True,
                            text=True, check=True)
    assert result.stdout.split("\n")[:2] == ["[]", "revcompile.backend"]
