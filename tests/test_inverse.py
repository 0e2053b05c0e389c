"""Each generated inverse rebuilds its layer's input streams from its output streams."""

import pytest
import torch

import revcompile
from revcompile.capture.tracer import dynamic_names
from conftest import ALL_MODELS, make_model, rel_err


@pytest.mark.parametrize("name", (*ALL_MODELS, "phi", "openai-gpt", "bloom"))  # + parallel and whole-layer forms
def test_generated_inverse_rebuilds_input(name):
    model = revcompile.make_reversible(make_model(name, torch.float64))
    model.eval()
    for pair in model._revcompile_plan.pairs:
        runtime = pair.module._revcompile
        hidden, context, signature = runtime.bind(pair.module, pair.call.args, pair.call.kwargs)
        _, coupled, inverse = runtime.coupling(pair.module, pair.call.args, pair.call.kwargs, signature)
        values = [context[name] for name in dynamic_names(signature)]
        streams = [hidden + 0.1 * torch.randn_like(hidden) for _ in runtime.scheme.streams]
        with torch.no_grad():
            out = coupled(*streams, *values)
            rebuilt = inverse(*out, *values)
        assert max(rel_err(a, b) for a, b in zip(rebuilt, streams)) < 1e-10
        assert max(rel_err(a, b) for a, b in zip(out, streams)) > 1e-3  # the layer did change its input


def test_inverse_graph_is_generated_from_the_steps():
    model = revcompile.make_reversible(make_model("mixtral"))
    _, coupled, inverse = model.model.layers[0]._revcompile.generated()
    calls = lambda gm: [n.target for n in gm.graph.nodes if n.op == "call_module"]  # noqa: E731
    assert calls(coupled) == ["attn", "mlp"] and calls(inverse) == ["mlp", "attn"]
    ops = lambda gm: sorted(n.target.__name__ for n in gm.graph.nodes if n.op == "call_function")  # noqa: E731
    assert ops(coupled) == ["add", "add"] and ops(inverse) == ["sub", "sub"]
