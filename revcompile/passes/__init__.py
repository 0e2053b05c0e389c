"""Analysis and rewrite passes over a layer's fx graph, one file a pass:

- `residuals`: find the chain of residual branches `r + B(r)` / `r + c*B(r)` (networkx dominators),
- `grad_mode`: turn a `with torch.no_grad():` block in a layer's code into detached values,
- `extract`:   cut each branch out as a GraphModule of its own,
- `classify`:  call each branch attention, dense FFN or MoE by what it does, not by class names,
- `rewrite`:   generate the coupled forward and inverse graphs of a scheme from its steps.
"""
