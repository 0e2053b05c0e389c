"""The command line: diff output, --dot files, one-line errors with a non-zero exit."""

import pytest
import torch

from revcompile.cli import main


def test_diff_shows_plan_graphs_inverse_and_op_counts(capsys, tmp_path):
    assert main(["diff", "mixtral", "--dot", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for expected in ("2 pairs", "before (traced layer graph)", "branch attn", "generated symplectic coupling",
                     "generated inverse", "sub = p - mlp", "op count changes"):
        assert expected in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["after.dot", "before.dot", "branch_attn.dot",
                                                          "branch_mlp.dot", "inverse.dot"]
    assert (tmp_path / "inverse.dot").read_text().startswith('digraph "inverse"')


def test_diff_of_a_local_model_directory(capsys, tmp_path):
    from revcompile.models import tiny_config

    tiny_config("olmoe").save_pretrained(tmp_path)
    assert main(["diff", str(tmp_path)]) == 0
    assert "2 pairs" in capsys.readouterr().out


def test_the_first_layers_of_a_checkpoint(capsys, tmp_path):
    """`--layers N` of a local checkpoint builds its first N layers with their saved weights (the others are never
    read) and cuts the per-layer lists of its config to match (GPT-OSS's sliding/full `layer_types`)."""
    from revcompile.models import load_model, tiny_model

    saved = tiny_model("gpt_oss", num_hidden_layers=4)
    saved.save_pretrained(tmp_path)
    model = load_model(str(tmp_path), layers=2)
    assert len(model.model.layers) == 2 and model.config.layer_types == saved.config.layer_types[:2]
    assert all(torch.equal(p, saved.get_parameter(name)) for name, p in model.named_parameters())
    assert main(["diff", str(tmp_path), "--layers", "3"]) == 0
    assert "3 pairs" in capsys.readouterr().out
    assert main(["check", str(tmp_path), "--layers", "2", "--seq", "8"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.1" in out and "model.layers.2" not in out
    assert main(["diff", str(tmp_path), "--layers", "5"]) == 2
    assert "the model has 4 layers, fewer than the 5 asked for" in capsys.readouterr().err


@pytest.mark.parametrize("model, message", [("no_such_model", "unknown model 'no_such_model'"),
                                            (".", "without a config.json"),
                                            ("xlm", "has no layer stack")])
def test_diff_bad_model_is_one_line_error(capsys, model, message):
    assert main(["diff", model]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("scheme, expected", [("fixed_point", "solve_attn = self.solve_attn("),
                                              ("meft1", "getitem"), ("midpoint", "layer = self.layer(cur")])
def test_diff_shows_each_schemes_generated_inverse(capsys, scheme, expected):
    assert main(["diff", "mixtral", "--scheme", scheme]) == 0
    out = capsys.readouterr().out
    assert f"generated {scheme} coupling" in out and "generated inverse" in out and expected in out


def test_diff_shows_every_traced_structure(capsys, tmp_path):
    """DeepSeek-V3's dense first layer and its MoE layers are two structures: both are shown and drawn."""
    assert main(["diff", "deepseek_v3", "--dot", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "2 distinct layer structures traced" in out
    for number, layer in ((1, "model.layers.0"), (2, "model.layers.1")):
        assert f"converted layer structure {number} of 2: {layer}" in out
        assert f"== {layer} before (traced layer graph) ==" in out and f"== {layer} (sequential) after:" in out
        assert (tmp_path / f"{layer}.inverse.dot").exists()


def test_diff_shows_a_branch_that_hands_state_on(capsys):
    """GLM-MoE-DSA's attention branch also returns the top-k indices the next layer reads: the plan and the branch
    say so, and the wrapped branch is not shown again as one the scheme composed."""
    assert main(["diff", "glm_moe_dsa"]) == 0
    out = capsys.readouterr().out
    assert "hands on to the next layer" in out and "output 1 (from attn)" in out
    assert "== branch attn (cut out of the layer graph; it also returns the layer's output 1) ==" in out
    assert "composed by the scheme" not in out


def test_op_count_table_counts_the_branches_ops():
    """The layer's own `mlp` child is still called once (inside the cut-out branch): not a removed op."""
    import revcompile
    from revcompile.cli import op_counts
    from revcompile.models import tiny_model

    model = revcompile.make_reversible(tiny_model("mixtral"))
    pair = revcompile.analyze(model).pairs[0]
    branches, coupled, _ = pair.module._revcompile.generated()
    cut = pair.module._revcompile.role_branches()
    after = op_counts(coupled.graph, skip_modules=tuple(branches)) + op_counts(*(b.graph for b in cut.values()))
    before = op_counts(pair.structure.trace.graph)
    assert before["module mlp"] == after["module mlp"] == 1


def test_diff_op_table_says_what_it_counts(capsys):
    assert main(["diff", "mixtral"]) == 0
    table = capsys.readouterr().out.split("== op count changes")[1]
    assert "coupling + branches" in table and "module mlp" not in table


def test_check_exits_non_zero_past_the_tolerance(capsys):
    """MEFT in bf16 over 4 layers: gradient error about 0.9 against the tolerance 0.05."""
    assert main(["check", "mixtral", "--dtype", "bfloat16", "--scheme", "meft1", "--layers", "4", "--seq", "16"]) == 1
    assert "EXCEEDS the tolerance" in capsys.readouterr().out
    assert main(["check", "mixtral", "--layers", "1", "--seq", "8"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.0" in out and "model.layers.1" not in out and "within the tolerance" in out


@pytest.mark.parametrize("argv, message", [
    (["check", "mixtral", "--layers", "0"], "argument --layers: must be at least 1, got 0"),
    (["check", "mixtral", "--layers", "-1"], "argument --layers: must be at least 1, got -1"),
    (["check", "mixtral", "--seq", "0"], "argument --seq: must be at least 2, got 0"),
    (["check", "mixtral", "--batch", "two"], "argument --batch: expected an integer, got 'two'"),
    (["check", "mixtral", "--scheme", "nope"], "argument --scheme: invalid choice: 'nope'"),
    (["demo", "--steps", "0"], "argument --steps: must be at least 1, got 0"),
])
def test_bad_options_are_usage_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["check", "mixtral", "--seq", "1000"], "--seq 1000 is longer than the model's 256 positions"),
])
def test_option_values_the_model_cannot_take_are_one_line_errors(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_every_option_has_help_with_its_default():
    from revcompile.cli import build_parser

    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    for name, command in commands.items():
        for action in command._actions:
            if action.option_strings and action.dest != "help":
                assert action.help and ("default" in action.help or action.dest == "dot"), (name, action.dest)
