"""revcompile: make an unmodified MoE LLM reversible with a torch.fx pass, so training stores no activations.

Example:
    >>> import revcompile
    >>> revcompile.make_reversible(model)          # in place
    >>> model(ids, labels=ids).loss.backward()     # backward rebuilds each layer's input from its output
    >>> model.save_pretrained("out")
    >>> model = revcompile.from_pretrained("out")  # reloaded converted the same way: the trained function

Importing it stays light (no Dynamo, Inductor, transformers or matplotlib until used): the torch.compile backend
"revcompile" is found through the `torch_dynamo_backends` entry point of the installed package, or registered by
`import revcompile.backend`.
"""

from .api import analyze, converted_layers, disable_inversion, inversion_report, make_reversible, undo
from .check import CheckReport, check
from .coupling import Scheme, Step
from .distill import distill, kl_divergence
from .errors import RevcompileError
from .optim import OptimizerInBackward, optimizer_in_backward
from .plan import Plan
from .runtime.head import chunked_cross_entropy, chunked_head
from .saving import from_pretrained
from .schemes import SCHEMES, get_scheme

__all__ = ["make_reversible", "analyze", "undo", "from_pretrained", "disable_inversion", "converted_layers",
           "inversion_report", "check", "CheckReport", "Plan", "Scheme", "Step", "SCHEMES", "get_scheme", "distill",
           "kl_divergence", "RevcompileError", "optimizer_in_backward", "OptimizerInBackward",
           "chunked_head", "chunked_cross_entropy"]
