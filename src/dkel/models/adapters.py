"""Foreign networks as dkel backbones: torchvision, timm, and any callable num_classes -> nn.Module.

A network is traced with torch.fx only as deep as needed: the network itself, the modules on
the way to the split point and the containers around its classifier are opened; every other
module stays one opaque call, so its own train/eval behaviour (dropout, drop-path) stays its
own.  The trace is cut at the first call of the split module: the trunk is everything before
it; the tail is everything from it to the logits and returns (logits, the classifier's input
as the pooled feature), so a ViT's tail ends with its own final norm, token pooling and head.
Both keep the original module names: trunk + tail assemble into one plain network whose
state dict is the original network's (`layer4.0.conv1.weight`, `fc.weight`, ...).

Where the last stage starts when no split is given:
- the network's one stack of transformer blocks (ViT, DeiT): its last quarter, as ResNet's
  last stage holds about a quarter of its blocks;
- otherwise the last module with weights that shrinks the feature map, among the network's
  children (a Sequential child's children in its place), on one probe batch: layer4 (ResNet,
  ResNeXt, WRN), features.N (MobileNet, EfficientNet, ConvNeXt), trunk_output.block4 or s4
  (RegNet), blocks.N or stages.N (timm);
- neither, or only the first module (VGG, AlexNet, Swin): the error lists where it can be cut.
Trunk outputs are taken as [B, C, H, W] maps or [B, N, D] tokens (pool_trunk).
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import inspect
from dataclasses import dataclass
from functools import partial, reduce
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor, fx, nn

from ..errors import ConfigError
from ..registry import unknown_name_message
from .core import Backbone, pool_trunk

# (num_classes, in_channels, image_size or None) -> a freshly initialised network
Network = Callable[[int, int, Optional[int]], nn.Module]

PROBE_SIZE = 64  # every stride-2 stage of a stride-32 network still shrinks a map this large
DEFAULT_SIZE = 224  # the input size torchvision and timm networks are built for
PASS_THROUGH = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                nn.FeatureAlphaDropout)  # between the pooled feature and the classifier
CONTAINERS = (nn.Sequential, nn.ModuleList)


def first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


# ----------------------------------------------------------------------------- sources
def torchvision_network(name: str) -> Network:
    import torchvision.models as tvm

    names = tvm.list_models(module=tvm)  # classification networks only
    if name not in names:
        raise ConfigError(unknown_name_message("torchvision model", name, names,
                                               "torchvision.models.list_models(module=torchvision.models)"))
    label = f"torchvision:{name}"

    def build(num_classes: int, in_channels: int, image_size: Optional[int]) -> nn.Module:
        make = partial(tvm.get_model, name, num_classes=num_classes, weights=None)
        net = construct(label, make, "image_size", image_size)
        if in_channels != 3:
            take_channels(net, in_channels, label)
        return net

    return build


def timm_network(name: str) -> Network:
    try:
        import timm
    except ImportError:
        raise ConfigError(f"model timm:{name} needs timm: pip install 'dkel[timm]'") from None
    if not timm.is_model(name):
        raise ConfigError(unknown_name_message("timm model", name, timm.list_models(), "timm.list_models()"))
    label = f"timm:{name}"

    def build(num_classes: int, in_channels: int, image_size: Optional[int]) -> nn.Module:
        make = partial(timm.create_model, name, pretrained=False, num_classes=num_classes, in_chans=in_channels)
        return construct(label, make, "img_size", image_size)

    return build


def imported_network(spec: str) -> Network:
    """`package.module:attribute` (dots in the attribute reach nested objects)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"model {spec!r} is not module:attribute")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:
        raise ConfigError(f"model {spec!r}: cannot import {module_name!r} ({first_line(e)})") from None
    try:
        obj = reduce(getattr, attr.split("."), obj)
    except AttributeError:
        raise ConfigError(f"model {spec!r}: module {module_name!r} has no attribute {attr!r}") from None
    return callable_network(obj, spec)


def callable_network(fn: Any, label: str) -> Network:
    """fn(num_classes) -> nn.Module; also given in_channels= and image_size= if it names them."""
    if isinstance(fn, nn.Module):
        raise ConfigError(f"model {label} is a network; pass what builds it, a callable num_classes -> nn.Module "
                          f"(dkel builds a fresh one for every peer and tail)")
    if not callable(fn):
        raise ConfigError(f"model {label} is a {type(fn).__name__}, not a callable num_classes -> nn.Module")
    try:
        names = set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # some builtins and C extensions have no signature
        names = set()

    def build(num_classes: int, in_channels: int, image_size: Optional[int]) -> nn.Module:
        extra: dict[str, int] = {}
        if "in_channels" in names:
            extra["in_channels"] = in_channels
        if "image_size" in names and image_size is not None:
            extra["image_size"] = image_size
        try:
            net = fn(num_classes, **extra)
        except Exception as e:
            raise ConfigError(f"model {label} raised {first_line(e)} when called with num_classes={num_classes}") from None
        if not isinstance(net, nn.Module):
            raise ConfigError(f"model {label} must return an nn.Module; it returned a {type(net).__name__}")
        return net

    return build


def construct(label: str, make: Callable[..., nn.Module], size_key: str, image_size: Optional[int]) -> nn.Module:
    """make(), given the data's image size as `size_key` where the constructor takes one (ViT)."""
    try:
        if image_size is not None:
            try:
                return make(**{size_key: image_size})
            except TypeError as e:
                if size_key not in str(e):
                    raise
        return make()
    except Exception as e:
        size = f" for {image_size}x{image_size} images" if image_size else ""
        raise ConfigError(f"{label} cannot be built{size}: {first_line(e)}") from None


def take_channels(net: nn.Module, in_channels: int, label: str) -> None:
    """torchvision networks take RGB: their first convolution is replaced by a freshly initialised
    one taking `in_channels` (same name, so the state dict keeps its keys)."""
    for name, m in net.named_modules():
        if isinstance(m, nn.Conv2d):
            if m.groups != 1:
                break
            parent, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent), child, nn.Conv2d(
                in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                bias=m.bias is not None, padding_mode=m.padding_mode))
            return
    raise ConfigError(f"{label} takes 3-channel images and has no first convolution dkel could give {in_channels} channels")


# ----------------------------------------------------------------------------- tracing
class _Tracer(fx.Tracer):
    def __init__(self, opened: set[str]):
        super().__init__()
        self.opened = opened

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname not in self.opened


def ancestors(name: str) -> set[str]:
    """The network itself ("") and every module containing `name`."""
    parts = name.split(".") if name else []
    return {".".join(parts[:i]) for i in range(len(parts))}


def trace(net: nn.Module, opened: set[str], label: str) -> fx.Graph:
    """The forward with only `opened` modules traced into, checked to be the same in both modes."""
    was_training = net.training
    graphs = []
    try:
        for mode in (True, False):
            net.train(mode)
            graphs.append(_trace_once(net, opened, label))
    finally:
        net.train(was_training)
    if str(graphs[0]) != str(graphs[1]):
        raise ConfigError(f"{label}'s forward takes another path in training than in evaluation (e.g. auxiliary "
                          f"outputs); dkel needs one network for both")
    return graphs[1]


def _trace_once(net: nn.Module, opened: set[str], label: str) -> fx.Graph:
    params = list(inspect.signature(net.forward).parameters.values())
    # arguments besides the image keep their defaults (timm's attn_mask=None, is_causal=False)
    concrete = {p.name: p.default for p in params[1:] if p.default is not p.empty}
    try:
        graph = _Tracer(opened).trace(net, concrete_args=concrete or None)
    except Exception as e:
        raise ConfigError(f"cannot split {label}: torch.fx cannot trace its forward ({first_line(e)})") from None
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    if not inputs:
        raise ConfigError(f"{label}'s forward takes no input")
    # what depends on the fixed arguments is only fx's check that they keep their defaults
    doomed: set[fx.Node] = set(inputs[1:])
    for n in graph.nodes:
        if any(a in doomed for a in n.all_input_nodes):
            doomed.add(n)
    if any(n.op == "output" or any(u not in doomed for u in n.users) for n in doomed):
        raise ConfigError(f"{label}'s forward computes with arguments besides the image; dkel passes only the image")
    for n in reversed(list(graph.nodes)):
        if n in doomed:
            graph.erase_node(n)
    return graph


@dataclass
class Traced:
    nodes: list[fx.Node]  # the graph's, in order
    logits: fx.Node  # the network's output
    head: fx.Node  # the nn.Linear classifier call giving it
    feature: fx.Node  # the classifier's input, before dropout and identities


def trace_to_head(net: nn.Module, opened: set[str], label: str) -> Traced:
    """Trace, opening the containers around the classifier until the output is an nn.Linear's."""
    opened = set(opened)
    while True:
        graph = trace(net, opened, label)
        nodes = list(graph.nodes)
        logits = nodes[-1].args[0]
        head = _skip(net, logits, (*PASS_THROUGH, nn.Flatten))  # timm's ClassifierHead flattens after fc
        if isinstance(head, fx.Node) and head.op == "call_module":
            module = net.get_submodule(head.target)
            if isinstance(module, nn.Linear):
                return Traced(nodes, logits, head, _skip(net, head.args[0], PASS_THROUGH))
            if head.target not in opened and next(module.children(), None) is not None:
                opened.add(head.target)
                continue
        what = head.format_node() if isinstance(head, fx.Node) else type(head).__name__
        raise ConfigError(f"{label} does not end in an nn.Linear classifier (its output is {what}); dkel "
                          f"takes the classifier's input as each tail's pooled feature")


def _skip(net: nn.Module, node: Any, kinds: tuple[type, ...]) -> Any:
    """Back from `node` past calls of modules of the given kinds."""
    while isinstance(node, fx.Node) and node.op == "call_module" and isinstance(net.get_submodule(node.target), kinds):
        node = node.args[0]
    return node


def live_across(nodes: list[fx.Node], start: int) -> list[fx.Node]:
    """Values computed before nodes[start] and used from there on (weights are fetched again)."""
    before = set(nodes[:start])
    return [n for n in nodes[:start] if n.op != "get_attr" and any(u not in before for u in n.users)]


def _starts(node: fx.Node, split: str) -> bool:
    return node.op == "call_module" and (node.target == split or node.target.startswith(split + "."))


def candidates(net: nn.Module, label: str) -> list[str]:
    """Modules where the network can be cut with one tensor passing: the network's children and
    those of its Sequential children, from the second module to the pooled feature."""
    opened = {""} | {n for n, m in net.named_children() if isinstance(m, CONTAINERS)}
    try:
        t = trace_to_head(net, opened, label)
    except ConfigError:
        return [n for n, _ in net.named_children()]
    found = [_stage_name(net, n.target) for i, n in enumerate(t.nodes[:t.nodes.index(t.feature)])
             if n.op == "call_module" and len(live_across(t.nodes, i)) == 1]
    return list(dict.fromkeys(found[1:]))


def _stage_name(net: nn.Module, name: str) -> str:
    """The container's name for its first child: a stage starts with its first block ("layer4", not "layer4.0")."""
    parent, _, child = name.rpartition(".")
    if parent and next(net.get_submodule(parent).named_children())[0] == child:
        return parent
    return name


def _choices(net: nn.Module, label: str) -> str:
    return "pass split=NAME, the first module of the tail, one of: " + ", ".join(candidates(net, label))


@dataclass
class Parts:
    trunk: fx.GraphModule  # image -> trunk output
    tail: fx.GraphModule  # trunk output -> (logits, pooled feature)


def split_network(net: nn.Module, split: str, label: str) -> Parts:
    """Cut `net` at the first call of module `split` ("" puts the whole network in the tail)."""
    if split:
        try:
            net.get_submodule(split)
        except AttributeError:
            raise ConfigError(f"{label} has no module {split!r}; {_choices(net, label)}") from None
    t = trace_to_head(net, {""} | ancestors(split), label)
    nodes = t.nodes
    starts = [i for i, n in enumerate(nodes) if (_starts(n, split) if split else n.op != "placeholder")]
    if not starts:
        raise ConfigError(f"{label} never calls module {split!r} in its forward; {_choices(net, label)}")
    start = starts[0]
    if start > nodes.index(t.head):
        raise ConfigError(f"split {split!r} comes after the classifier of {label}; {_choices(net, label)}")
    crossing = live_across(nodes, start)
    if len(crossing) != 1:
        used = ", ".join(n.name for n in crossing)
        raise ConfigError(f"cannot split {label} at {split!r}: the layers from there on use more than one value "
                          f"computed before it ({used}); {_choices(net, label)}")
    trunk_graph, env = fx.Graph(), {}
    for n in nodes[:start]:
        env[n] = trunk_graph.node_copy(n, env.__getitem__)
    trunk_graph.output(env[crossing[0]])
    tail_graph = fx.Graph()
    env = {crossing[0]: tail_graph.placeholder("h")}

    def value(n: fx.Node) -> fx.Node:
        if n not in env:  # a weight first fetched before the split
            env[n] = tail_graph.node_copy(n, value)
        return env[n]

    for n in nodes[start:-1]:
        env[n] = tail_graph.node_copy(n, value)
    tail_graph.output((env[t.logits], value(t.feature)))
    name = type(net).__name__
    parts = Parts(fx.GraphModule(net, trunk_graph, class_name=f"{name}Trunk"),
                  fx.GraphModule(net, tail_graph, class_name=f"{name}Tail"))
    shared = _tensor_ids(parts.trunk) & _tensor_ids(parts.tail)
    if shared:
        raise ConfigError(f"cannot split {label} at {split!r}: some weights are used both before and after it; "
                          f"{_choices(net, label)}")
    return parts


def _tensor_ids(m: nn.Module) -> set[int]:
    return {id(t) for t in [*m.parameters(), *m.buffers()]}


def _input(graph: fx.Graph) -> fx.Node:
    return next(n for n in graph.nodes if n.op == "placeholder")


def _owned(gm: fx.GraphModule) -> dict[str, Any]:
    """Qualified name -> module or tensor, for every module and weight the graph refers to."""
    return {n.target: reduce(getattr, n.target.split("."), gm)
            for n in gm.graph.nodes if n.op in ("call_module", "get_attr")}


def _tree(objects: dict[str, Any]) -> nn.Module:
    """A module holding each object under its qualified name."""
    root = nn.Module()
    for target, obj in objects.items():
        *path, name = target.split(".")
        parent = root
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        if isinstance(obj, nn.Module):
            parent.add_module(name, obj)
        elif isinstance(obj, nn.Parameter):
            parent.register_parameter(name, obj)
        else:
            parent.register_buffer(name, obj)
    return root


def assemble(trunk: fx.GraphModule, tail: fx.GraphModule, *, class_name: str) -> fx.GraphModule:
    """The plain network: trunk then tail, returning the logits, under the original module names."""
    graph = fx.Graph()
    h = graph.graph_copy(trunk.graph, {_input(trunk.graph): graph.placeholder("x")})
    logits, _ = graph.graph_copy(tail.graph, {_input(tail.graph): h})
    graph.output(logits)
    # given a module, GraphModule registers in the order of the calls, so the state dict lists the
    # layers as the network usually does; given a dict it sorts by depth (RegNet: fc before trunk_output)
    return fx.GraphModule(_tree({**_owned(trunk), **_owned(tail)}), graph, class_name=class_name)


# ----------------------------------------------------------------------------- where to split
def auto_split(net: nn.Module, label: str, in_channels: int, image_size: Optional[int]) -> str:
    blocks = _block_stack(net)
    if blocks is not None:
        stack, names = blocks
        return f"{stack}.{names[len(names) - max(1, len(names) // 4)]}"
    stage = _last_downsampling(net, label, in_channels, image_size)
    if stage is None:
        raise ConfigError(f"cannot tell where the last stage of {label} starts; {_choices(net, label)}")
    return stage


def _block_stack(net: nn.Module) -> Optional[tuple[str, list[str]]]:
    """The Sequential/ModuleList (at most two levels down) whose children all hold attention, if the
    network has one such stack (ViT); hierarchical transformers (Swin) have one per stage."""
    stacks = [(name, [n for n, _ in m.named_children()]) for name, m in net.named_modules()
              if name.count(".") <= 1 and isinstance(m, CONTAINERS) and len(m) >= 2
              and all(_has_attention(c) for c in m.children())]
    return stacks[0] if len(stacks) == 1 else None


def _has_attention(m: nn.Module) -> bool:
    return any(isinstance(s, nn.MultiheadAttention) or type(s).__name__.endswith("Attention") for s in m.modules())


def _last_downsampling(net: nn.Module, label: str, in_channels: int, image_size: Optional[int]) -> Optional[str]:
    # the network's children, a container's children in its place
    watched = []
    for name, child in net.named_children():
        inner = [f"{name}.{sub}" for sub, _ in child.named_children()] if isinstance(child, CONTAINERS) else []
        watched += inner or [name]
    started: list[str] = []
    shrinking: set[str] = set()

    def record(name: str, m: nn.Module, args: tuple, out: Any) -> None:
        x = args[0] if args else None
        if (isinstance(x, Tensor) and isinstance(out, Tensor) and x.dim() == out.dim() == 4
                and out.shape[-2] * out.shape[-1] < x.shape[-2] * x.shape[-1] and next(m.parameters(), None) is not None):
            shrinking.add(name)

    def run(model: nn.Module, x: Tensor) -> None:
        started.clear()
        shrinking.clear()
        handles = [h for name in watched for h in (
            model.get_submodule(name).register_forward_pre_hook(lambda m, args, name=name: started.append(name)),
            model.get_submodule(name).register_forward_hook(partial(record, name)))]
        try:
            model(x)
        finally:
            for h in handles:
                h.remove()

    error: Optional[Exception] = None
    for size in dict.fromkeys([PROBE_SIZE, image_size or DEFAULT_SIZE]):
        try:
            shapes_of(run, [net], (2, in_channels, size, size))
            error = None
            break
        except Exception as e:
            error = e
    if error is not None:  # the whole network fails, so no split would help
        raise ConfigError(f"{label} cannot run on this dataset's images (a batch of {in_channels}-channel "
                          f"{size}x{size} images: {first_line(error)}); it must accept such images")
    last = [n for n in started if n in shrinking]
    # a split at the first module would leave no trunk to share (AlexNet's only stride is its stem)
    if not last or _stage_name(net, last[-1]) == _stage_name(net, started[0]):
        return None
    return _stage_name(net, last[-1])


def shapes_of(run: Callable[..., Any], modules: list[nn.Module], shape: tuple[int, ...]) -> Any:
    """run(*modules in eval mode, zeros of `shape`), on the meta device: shapes without the arithmetic
    (a first CPU pass over a network's layers costs seconds); on the CPU if the network needs values."""
    try:
        return run(*[on_meta(m) for m in modules], torch.zeros(shape, device="meta"))
    except Exception:
        with evaluating(*modules), torch.no_grad():
            return run(*modules, torch.zeros(shape))


def on_meta(module: nn.Module) -> nn.Module:
    """A copy in eval mode whose weights are meta tensors (nothing is copied but the structure)."""
    memo: dict[int, Any] = {id(p): nn.Parameter(p.to("meta"), p.requires_grad) for p in module.parameters()}
    memo.update({id(b): b.to("meta") for b in module.buffers()})
    return copy.deepcopy(module, memo).eval()


@contextlib.contextmanager
def evaluating(*modules: nn.Module) -> Iterator[None]:
    modes = [[(m, m.training) for m in module.modules()] for module in modules]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for pairs in modes:
            for m, mode in pairs:
                m.training = mode


# ----------------------------------------------------------------------------- backbones
class _Tails:
    """make_tail: the built network's own tail first, then the tails of freshly built networks,
    so every tail starts from the network's own initialisation and no two share a weight."""

    def __init__(self, first: nn.Module, fresh: Callable[[], nn.Module]):
        self.first: Optional[nn.Module] = first
        self.fresh = fresh

    def __call__(self) -> nn.Module:
        if self.first is None:
            return self.fresh()
        tail, self.first = self.first, None
        return tail


@dataclass(frozen=True)
class Adapter:
    """Backbone factory (num_classes, in_channels) -> Backbone for one foreign network.

    split: the dotted name of the first tail module; None finds where the last stage starts;
    "" makes the whole network the tail (whole-network methods).  image_size: the data's."""

    label: str
    network: Network
    split: Optional[str] = None
    image_size: Optional[int] = None

    def __call__(self, num_classes: int, in_channels: int = 3) -> Backbone:
        net = self.network(num_classes, in_channels, self.image_size)
        split = self.split if self.split is not None else auto_split(net, self.label, in_channels, self.image_size)
        parts = split_network(net, split, self.label)
        trunk_channels, feature_dim = self._probe(parts, split, num_classes, in_channels)

        def fresh_tail() -> nn.Module:
            return split_network(self.network(num_classes, in_channels, self.image_size), split, self.label).tail

        return Backbone(parts.trunk, _Tails(parts.tail, fresh_tail), feature_dim, trunk_channels,
                        partial(assemble, class_name=type(net).__name__))

    def _probe(self, parts: Parts, split: str, num_classes: int, in_channels: int) -> tuple[int, int]:
        """(trunk width after pool_trunk, feature width), checking the network gives [B, C] logits."""
        size = self.image_size or DEFAULT_SIZE

        def run(trunk: nn.Module, tail: nn.Module, x: Tensor) -> tuple[Any, Any, Any]:
            h = trunk(x)
            return (h, *tail(h))

        try:
            h, logits, feature = shapes_of(run, [parts.trunk, parts.tail], (2, in_channels, size, size))
        except Exception as e:
            raise ConfigError(f"{self.label} fails on a batch of {in_channels}x{size}x{size} images: {first_line(e)}") from None
        if not isinstance(logits, Tensor) or tuple(logits.shape) != (2, num_classes):
            shape = list(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ConfigError(f"{self.label} outputs {shape} for a batch of 2, not [2, {num_classes}] logits")
        if feature.dim() != 2:
            raise ConfigError(f"{self.label}'s classifier takes a {list(feature.shape)} input, not a pooled "
                              f"[batch, features] one")
        if not isinstance(h, Tensor) or h.dim() not in (2, 3, 4):
            raise ConfigError(f"the trunk of {self.label} (split at {split!r}) does not output a feature map, "
                              f"token sequence or vector")
        return pool_trunk(h).shape[1], feature.shape[1]
