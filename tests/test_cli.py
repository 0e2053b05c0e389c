"""The command line: diff output, --dot files, one-line errors with a non-zero exit."""

import pytest

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
