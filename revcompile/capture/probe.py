"""Find the layer stacks of a model by running it once on a tiny input and watching its ModuleLists.

A stack is an `nn.ModuleList` whose children are called once each, in order, each on the hidden state the previous
one returned: Hugging Face's `for decoder_layer in self.layers`, or a plain `for block in self.blocks`. Names do
not matter. The recorded calls (arguments, keyword arguments, outputs) tell the tracer each layer's call signature
and give the analysis passes real values to classify branches with.

NOTE: outputs read elsewhere. Converted layers hand each other packed reversible streams, not hidden states, so a
layer's output may only go to the next layer. Some models also read it themselves (Inkling2 stacks the input of
every sixth layer into a list of block states); the probe watches every torch function that runs outside the
stack's layers and the arguments of every call of a list's child made outside them, and `Stack.read_elsewhere`
names, per layer, what else read its output: a reversible run must end at that layer.

Example:
    >>> stacks = find_stacks(model, example_call(model))
    >>> stacks[0].name, len(stacks[0].layers)
    ('model.layers', 2)
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ..errors import RevcompileError

PROBE_TOKENS = 8


@dataclass
class LayerCall:
    """One recorded call of a layer; `child_nones`: per direct child that returned a tuple holding None in this
    call, (the tuple's length, where it held None), as the tracer may bake them in (`tracer.trace_layer`); None for
    a child whose calls disagreed."""

    args: tuple
    kwargs: dict
    output: Any
    child_nones: dict[str, tuple[int, frozenset[int]] | None] = field(default_factory=dict)


def _nones_of(output: Any) -> tuple[int, frozenset[int]] | None:
    """(length, positions of None) of a tuple output that holds None, else None."""
    if type(output) is not tuple or not any(value is None for value in output):
        return None
    return len(output), frozenset(i for i, value in enumerate(output) if value is None)


@dataclass
class Stack:
    """A ModuleList run as a chain of layers, with the recorded call of each layer."""

    name: str
    layers: nn.ModuleList
    calls: list[LayerCall]
    read_elsewhere: dict[int, str] = field(default_factory=dict)  # layer index -> what else read its output


def default_example(model: nn.Module) -> tuple[tuple, dict[str, Any]]:
    """(args, kwargs) for a probe run: PROBE_TOKENS random tokens for the model's embedding.

    Hugging Face models get `input_ids=..., use_cache=False`; other models get the ids as the first argument.
    Raises RevcompileError when the model has no token embedding to size them by.
    """
    embedding = None
    if hasattr(model, "get_input_embeddings"):
        embedding = model.get_input_embeddings()
    if not isinstance(embedding, nn.Embedding):
        embedding = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if embedding is None:
        raise RevcompileError(f"{type(model).__name__} has no token embedding to build a probe input from; pass "
                              "example_inputs=(args tuple), a tensor, or dict(...) of keyword arguments for one "
                              "forward call")
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, embedding.num_embeddings, (1, PROBE_TOKENS), generator=generator)
    ids = ids.to(embedding.weight.device)
    if hasattr(model, "config"):
        return (), {"input_ids": ids, "use_cache": False}
    return (ids,), {}


def example_call(model: nn.Module, example_inputs: Any = None) -> tuple[tuple, dict[str, Any]]:
    """Normalise `example_inputs` (None, a tensor, a tuple of arguments or a dict of keywords) to (args, kwargs)."""
    if example_inputs is None:
        return default_example(model)
    if isinstance(example_inputs, dict):
        return (), example_inputs
    if isinstance(example_inputs, tuple):
        return example_inputs, {}
    return (example_inputs,), {}


@contextmanager
def eval_mode(model: nn.Module):
    """Temporarily put `model` in eval mode (dropout off), restoring each module's own mode afterwards."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training
        # NOTE: a module created inside the block (BigBird replaces its attention on its first call, in the mode of
        # its parent) takes its parent's restored mode: left in eval, its dropout would be off in training
        for parent in model.modules():
            for child in parent.children():
                if child not in modes:
                    child.train(parent.training)


def _first_tensor(value: Any) -> Any:
    if isinstance(value, (tuple, list)) and value:
        return value[0]
    return value


def _function_name(func) -> str:
    """`unsqueeze`, or `.dtype` for an attribute's getter."""
    name = getattr(func, "__name__", str(func))
    return f".{func.__self__.__name__}" if name == "__get__" and hasattr(func, "__self__") else name


class _ReadsOutsideLayers(TorchFunctionMode):
    """Records the tensors torch functions read while no child of a ModuleList is running (`depth` 0), by id, with
    the function's name. Neither a function that returns its input itself (`.to()` to where it is) nor `.device`
    (the streams live where the hidden state does) reads anything that packed streams would change."""

    def __init__(self):
        super().__init__()
        self.depth = 0
        self.read: dict[int, tuple[torch.Tensor, str]] = {}  # (the tensor is kept: ids stay unique)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if self.depth == 0 and _function_name(func) != ".device":
            for value in tree_flatten((args, kwargs))[0]:
                if isinstance(value, torch.Tensor) and value is not result:
                    self.read.setdefault(id(value), (value, _function_name(func)))
        return result


def _read_elsewhere(record: list[LayerCall], reads: _ReadsOutsideLayers,
                    outer_calls: list[tuple[nn.Module, LayerCall]], names: dict[nn.Module, str]) -> dict[int, str]:
    """Per layer of a stack but the last: what read its output besides the next layer (a torch function outside
    the layers, or the call of a list's child that no layer ran, as another stack's)."""
    found = {}
    for i, call in enumerate(record[:-1]):
        out = _first_tensor(call.output)
        if id(out) in reads.read:
            found[i] = f"the model's own code ({reads.read[id(out)][1]})"
            continue
        for module, other in outer_calls:
            values = tree_flatten((other.args[1:], other.kwargs) if other is record[i + 1] else
                                  (other.args, other.kwargs))[0]
            if any(value is out for value in values):
                found[i] = f"{names.get(module, type(module).__name__)}'s call"
                break
    return found


def find_stacks(model: nn.Module, example: tuple[tuple, dict[str, Any]], misses: list[str] | None = None
                ) -> list[Stack]:
    """Run `model(*args, **kwargs)` once (eval mode, no grad) and return the layer stacks it used, in order.

    misses: if given, gets why a list whose layers each ran once on a hidden state is not a stack (a reason to
    report when there is none)."""
    calls: dict[nn.Module, list[LayerCall]] = {}
    outer_calls: list[tuple[nn.Module, LayerCall]] = []  # the calls made while no list's child was running
    running: set[nn.Module] = set()
    handles = []
    reads = _ReadsOutsideLayers()

    def record_input(module, args, kwargs):
        calls.setdefault(module, []).append(LayerCall(args, kwargs, None))
        running.add(module)
        if reads.depth == 0:
            outer_calls.append((module, calls[module][-1]))
        reads.depth += 1

    def record_output(module, args, kwargs, output):
        calls[module][-1].output = output
        running.discard(module)
        reads.depth -= 1

    def record_child(layer: nn.Module, name: str):
        def record(module, args, output):
            if layer not in running:  # (a module shared with code outside the layer)
                return
            call = calls[layer][-1]
            # (a child called twice in the call, with other Nones, is recorded as returning no None: not baked in)
            nones = _nones_of(output)
            if call.child_nones.setdefault(name, nones) != nones:
                call.child_nones[name] = None
        return record

    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    for _, modules in lists:
        for child in modules:
            handles.append(child.register_forward_pre_hook(record_input, with_kwargs=True))
            handles.append(child.register_forward_hook(record_output, with_kwargs=True))
            handles += [grandchild.register_forward_hook(record_child(child, name))
                        for name, grandchild in child.named_children()]
    try:
        with torch.no_grad(), eval_mode(model), reads:
            model(*example[0], **example[1])
    except Exception as err:
        if any(p.is_meta for p in model.parameters()):  # (not refused before the run: offloading hooks load them)
            raise RevcompileError(f"{type(model).__name__}'s parameters are on the meta device and the probe run "
                                  f"failed ({type(err).__name__}: {err}): revcompile runs the model once to find "
                                  "and trace its layers; materialize it first (model.to_empty(device=...) and load "
                                  "or initialise its weights), then convert it, then shard it") from err
        raise RevcompileError(f"the probe run of {type(model).__name__} failed ({type(err).__name__}: {err}); pass "
                              "example_inputs that the model accepts") from err
    finally:
        for handle in handles:
            handle.remove()

    stacks = []
    names = {m: n for n, m in model.named_modules()}
    for name, modules in lists:
        layer_calls = [calls.get(child, []) for child in modules]
        if not all(len(c) == 1 for c in layer_calls):
            continue
        record = [c[0] for c in layer_calls]
        hidden_in = [r.args[0] if r.args else None for r in record]
        if not all(isinstance(h, torch.Tensor) and h.is_floating_point() for h in hidden_in):
            continue
        chained = all(_first_tensor(record[i].output) is hidden_in[i + 1] for i in range(len(record) - 1))
        shaped = all(getattr(_first_tensor(r.output), "shape", None) == h.shape for r, h in zip(record, hidden_in))
        if not chained and misses is not None:
            broken = next(i for i in range(len(record) - 1) if _first_tensor(record[i].output) is not hidden_in[i + 1])
            misses.append(f"in {name}, layer {broken}'s output is not what layer {broken + 1} is called on (the model "
                          "changes the hidden state between them)")
        if chained and shaped:
            if any(h.isnan().any() for h in hidden_in):
                raise RevcompileError(f"the probe run of {type(model).__name__} gave nan in the hidden states entering "
                                      f"{name}: revcompile decides how to convert the layers from this run; if the "
                                      "weights are not initialised (memory from to_empty), initialise or load them "
                                      "first")
            stacks.append(Stack(name, modules, record, _read_elsewhere(record, reads, outer_calls, names)))
    return stacks


def _carries_gradient(value: Any) -> bool:
    return any(isinstance(t, torch.Tensor) and t.grad_fn is not None for t in tree_flatten(value)[0])


def _added(container: list | dict, old: list | dict) -> list:
    """The values in `container` that were not in its `old` copy (by identity)."""
    if isinstance(container, dict):
        return [v for k, v in container.items() if k not in old or old[k] is not v]
    kept = {id(v) for v in old}
    return [v for v in container if id(v) not in kept]


def _reads_back(module: nn.Module, key: str) -> bool:
    """Does the module's own class read attribute `key` (`self.key` loaded, not only assigned), making it the
    module's state, a cache for its next call, rather than a value stored for others? False without its source."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(type(module))))
    except (OSError, TypeError, SyntaxError):
        return False
    return any(isinstance(node, ast.Attribute) and node.attr == key and isinstance(node.ctx, ast.Load) and
               isinstance(node.value, ast.Name) and node.value.id == "self" for node in ast.walk(tree))


def stored_with_gradient(layer: nn.Module, call: LayerCall) -> list[str]:
    """Where the layer's forward stores a tensor that carries gradient outside its output: module attributes it sets
    and its own code never reads (`self.aux_loss = ...`; RecurrentGemma's `self.recurrent_states`, read back by its
    next call, is its state), or lists and dicts held by its modules that it adds to (`self.logits.append(...)`).

    NOTE: why it matters. A reversible layer runs its forward without grad and again, with grad, in backward: such a
    value would be computed without gradient and whatever reads it (an auxiliary loss) would train nothing through
    it, silently. The layer is run once with grad on the probe's call (eval mode, RNG forked); the lists and dicts
    get their old contents back, and the attributes that carry gradient their old values.

    Example:
        >>> stored_with_gradient(block, call)
        ['ff.collected']
    """
    names = {m: n for n, m in layer.named_modules()}
    before = {m: {k: v for k, v in vars(m).items() if not k.startswith("_")} for m in names}
    contents = {id(v): (v, list(v) if isinstance(v, list) else dict(v)) for attributes in before.values()
                for v in attributes.values() if isinstance(v, (list, dict))}
    device = next((t.device for t in tree_flatten((call.args, call.kwargs))[0] if isinstance(t, torch.Tensor)),
                  torch.device("cpu"))
    found = set()
    try:
        with torch.enable_grad(), eval_mode(layer), torch.random.fork_rng(
                devices=[device] if device.type == "cuda" else [], device_type=device.type):
            layer(*call.args, **call.kwargs)
    finally:
        for module, attributes in before.items():
            prefix = names[module] + "." if names[module] else ""
            for key, value in list(vars(module).items()):
                if key.startswith("_") or attributes.get(key) is value or not _carries_gradient(value):
                    continue
                if not _reads_back(module, key):
                    found.add(prefix + key)
                if key in attributes:
                    setattr(module, key, attributes[key])
                else:
                    delattr(module, key)
            for key, value in attributes.items():
                if isinstance(value, (list, dict)) and _carries_gradient(_added(value, contents[id(value)][1])):
                    found.add(prefix + key)
        for container, old in contents.values():  # (each once, though modules share it)
            container.clear()
            if isinstance(container, dict):
                container.update(old)
            else:
                container.extend(old)
    return sorted(found)
