"""Which layers of a backbone can be stored, and the record of each stored layer.

:func:`list_layers` probes a backbone once on a dummy batch and describes every node whose
output can become a per-image vector: its kind (``map`` = NCHW, ``map-nhwc``, ``tokens``,
``vector``), its shape, its depth index (0 = shallowest) and its short aliases.
:func:`resolve_layers` turns user-given names into :class:`LayerSpec` records, checking
all of them before any image is read.

Aliases: ``avgpool`` is the final pooled vector on every family (for models without an
``avgpool`` module, the deepest map or token layer); ``stageK`` is the deepest layer whose
map is 1/2^K of the input size (timm's reduction convention: ResNet's ``layer1`` is
``stage2``).

Example::

    >>> from featurecache.backbones import load_backbone
    >>> bb = load_backbone("efficientnet_lite0", weights="none")
    >>> [(l.name, l.kind, l.width()) for l in list_layers(bb).layers][-3:]
    [('avgpool', 'map', 1280), ('classifier', 'vector', 1000), ('classifier.1', 'vector', 1000)]
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import OptionError, UnknownLayerError, close_matches
from .extract import POOLS, TOKEN_POOLS, raw_extractor
from .options import DEFAULT_BACKBONE, declared, validated
from .store.layout import LayerSpec  # the record the file stores; torch-free

__all__ = ["LayerInfo", "LayerSpec", "Listing", "describe_layers", "list_layers", "probe", "resolve_layers",
           "resolve_maps"]

_SKIP = (nn.Dropout, nn.Identity)
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_PROBE_BATCH = 2


@dataclass(frozen=True)
class LayerInfo:
    """One row of ``featurecache layers``: a node that can be stored."""

    name: str
    kind: str
    shape: tuple          # per-image output shape, batch axis removed
    depth: int
    aliases: tuple = ()
    node: str = ""        # the name extraction asks for; layers ending on the same graph
                          # node (``features`` and ``features.30``) share one

    def width(self, pool: str = "avg") -> int:
        """Stored width after pooling with ``pool``."""
        if self.kind == "map":
            c = self.shape[0]
        elif self.kind in ("map-nhwc", "tokens"):
            c = self.shape[-1]
        else:
            return int(math.prod(self.shape))
        return 2 * c if pool == "avgmax" and self.kind != "tokens" else c


@dataclass
class Listing:
    """The storable layers of a backbone, the aliases, and how they are extracted."""

    layers: list
    aliases: dict = field(default_factory=dict)   # alias -> layer name
    method: str = "fx"                            # fx | hooks
    note: str = ""                                # why hooks are used, when they are

    def names(self) -> list:
        return [l.name for l in self.layers] + list(self.aliases)

    def get(self, name: str) -> LayerInfo | None:
        name = self.aliases.get(name, name)
        return next((l for l in self.layers if l.name == name), None)


def _module_names(model: nn.Module) -> list[str]:
    """Module-level candidates: top-level children, and the children of containers."""
    names = []

    def walk(module: nn.Module, prefix: str, level: int):
        for child_name, child in module.named_children():
            name = f"{prefix}{child_name}"
            if isinstance(child, _SKIP):
                continue
            names.append(name)
            has_container = any(isinstance(c, _CONTAINERS) for c in child.children())
            if level < 3 and (isinstance(child, _CONTAINERS) or (level == 0 and has_container)):
                walk(child, name + ".", level + 1)

    walk(model, "", 0)
    return names


def _kind(shape: tuple) -> str | None:
    if len(shape) == 4:
        _, a, b, c = shape
        if b == c or a != b:
            return "map"
        return "map-nhwc"
    return {3: "tokens", 2: "vector"}.get(len(shape))


def probe(model: nn.Module, names: list[str], size: int, method: str = "auto"):
    """Run ``names`` once on a dummy batch; return ``({name: (kind, shape)}, method)``.

    Names whose output is not a batched tensor (parameters, ints) are left out.
    """
    extractor, used = raw_extractor(model, names, method)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(_PROBE_BATCH, 3, size, size, generator=gen)
    with torch.inference_mode():
        out = extractor(x)
    found = {}
    # hooks fire as modules finish, so their dict is in forward order (a parent after its children)
    for name in (list(out) if used == "hooks" else names):
        t = out.get(name)
        if not isinstance(t, torch.Tensor) or t.dim() < 2 or t.shape[0] != _PROBE_BATCH:
            continue
        kind = _kind(tuple(t.shape))
        if kind:
            found[name] = (kind, tuple(t.shape[1:]))
    return found, used


@validated("layers")
def describe_layers(backbone: str = DEFAULT_BACKBONE, *, weights: str | None = "none",
                    all_nodes: bool = False, pool: str = "avg") -> dict:
    """``featurecache layers``: the storable layers of a backbone, loaded by name.

    Returns ``{"backbone", "method", "note", "layers": [{"name", "kind", "shape", "width",
    "depth", "aliases"}]}``, widths after ``pool``; the weights (default: none, the fastest)
    change no shape.
    """
    from .backbones import load_backbone

    listing = list_layers(load_backbone(backbone, weights), all_nodes=all_nodes)
    rows = [{"name": l.name, "kind": l.kind, "shape": list(l.shape), "width": l.width(pool),
             "depth": l.depth, "aliases": list(l.aliases)} for l in listing.layers]
    return {"backbone": backbone, "method": listing.method, "note": listing.note, "layers": rows}


def list_layers(backbone, all_nodes: bool = False, method: str = "auto") -> Listing:
    """Describe the storable layers of ``backbone`` (a :class:`~featurecache.backbones.Backbone`).

    Three steps: the candidate names (FX graph nodes and module names, or module names for
    forward hooks) -> one name per distinct output (``features`` and ``features.30`` end on
    the same node) -> one probe of those names, ranked by depth.

    Args:
        all_nodes: list every FX graph node, not just module-level layers.
        method: ``"auto"``, ``"fx"`` or ``"hooks"`` (forward hooks on module names).
    """
    model, size = backbone.model, backbone.preprocess.crop
    names, position, method, note = _candidates(model, all_nodes, method)
    first = _dedupe(names, position)
    found, method = probe(model, list(first.values()), size, method)
    if method == "hooks":  # positions are the order in which the hooks fired
        position = {n: i for i, n in enumerate(found)}
        first = {i: n for n, i in position.items()}
    infos = _rank(names, position, first, found)
    aliases = _aliases(infos, size)
    by_target: dict = {}
    for alias, target in aliases.items():
        by_target.setdefault(target, []).append(alias)
    infos = [dataclasses.replace(l, aliases=tuple(by_target.get(l.name, ()))) for l in infos]
    return Listing(infos, aliases, method, note)


def _candidates(model: nn.Module, all_nodes: bool, method: str):
    """``(names, position, method, note)``: the names that may be stored, in listing order,
    and the position of the graph node (or module) whose output each one is."""
    note = ""
    if method in ("auto", "fx"):
        try:
            from torchvision.models.feature_extraction import get_graph_node_names

            graph = [n for n in get_graph_node_names(model)[1] if n != "x"]
        except Exception as exc:  # noqa: BLE001
            if method == "fx":
                raise
            note = f"FX tracing failed ({type(exc).__name__}: {str(exc)[:120]}); using forward hooks"
        else:
            position = {n: i for i, n in enumerate(graph)}
            mods = [n for n in _module_names(model)
                    if n in position or any(g.startswith(n + ".") for g in graph)]
            for m in mods:  # a module's output is its last node (torchvision's rule)
                if m not in position:
                    position[m] = max(i for g, i in position.items() if g.startswith(m + "."))
            names = list(dict.fromkeys(mods + graph)) if all_nodes else mods
            return names, position, "fx", note
    names = [n for n, _ in model.named_modules() if n] if all_nodes else _module_names(model)
    position = {n: i for i, (n, _) in enumerate(model.named_modules())}
    return names, position, "hooks", note


def _dedupe(names: list, position: dict) -> dict:
    """Output position -> the first candidate name that ends there (the one probed)."""
    first: dict = {}
    for n in names:
        first.setdefault(position[n], n)
    return first


def _rank(names: list, position: dict, first: dict, found: dict) -> list:
    """:class:`LayerInfo` of every candidate whose output the probe found, shallowest first;
    names sharing an output share its depth and its probed node."""
    found = {n: found[first[position[n]]] for n in names
             if n in position and first[position[n]] in found}
    ranks = {pos: r for r, pos in enumerate(sorted({position[n] for n in found}))}
    return sorted((LayerInfo(n, k, s, ranks[position[n]], (), first[position[n]])
                   for n, (k, s) in found.items()), key=lambda l: (l.depth, l.name))


def _reduction(info: LayerInfo, size: int) -> int:
    """Input size / map height (the stride of a feature map); 0 for tokens and vectors."""
    if info.kind not in ("map", "map-nhwc"):
        return 0
    h = info.shape[1] if info.kind == "map" else info.shape[0]
    return max(1, round(size / h))


def _aliases(infos: list, size: int) -> dict:
    names = {l.name for l in infos}
    aliases = {}
    spatial = [l for l in infos if l.kind in ("map", "map-nhwc")]
    if "avgpool" not in names:
        deep = [l for l in infos if l.kind in ("map", "map-nhwc", "tokens")]
        if deep:
            aliases["avgpool"] = deep[-1].name
    for l in spatial:  # later (deeper) layers overwrite: stageK = deepest at 1/2^K
        h = l.shape[1] if l.kind == "map" else l.shape[0]
        if h > 1:
            stage = f"stage{round(math.log2(size / h))}"
            if stage not in names:
                aliases[stage] = l.name
    return dict(sorted(aliases.items()))


def resolve_maps(backbone, names, size: int | None = None,
                 listing: Listing | None = None) -> list[LayerSpec]:
    """:class:`LayerSpec` records of unpooled feature maps to store (``pool="map"``, shape
    ``(C, S, S)``, ``S`` = ``size`` or the map's own height).

    Raises:
        UnknownLayerError: a name is not a layer of the backbone.
        OptionError: a layer is not a feature map, or ``size`` is larger than the map.
    """
    names = list(dict.fromkeys(names))
    if not names:
        return []
    plain = resolve_layers(backbone, names, listing=listing)  # names checked, close matches
    specs = []
    for spec in plain:
        if spec.kind not in ("map", "map-nhwc"):
            raise OptionError(f"{spec.name!r} is a {spec.kind} layer, not a feature map; keep "
                              f"(or fine-tune from) the map of a convolutional stage (stageK, "
                              f"blocks.N).")
        c, h, w = spec.shape if spec.kind == "map" else (spec.shape[2], *spec.shape[:2])
        s = size or h
        if s > min(h, w):
            raise OptionError(f"map_size = {s} is larger than the {h}x{w} map of "
                              f"{spec.name!r}; give at most {min(h, w)}.")
        specs.append(dataclasses.replace(spec, pool="map", dim=c * s * s, shape=(c, s, s),
                                         reduction=spec.reduction * h // s))
    return specs


def resolve_layers(backbone, names, pool: str = "avg", token_pool: str = "cls",
                   listing: Listing | None = None) -> list[LayerSpec]:
    """Turn layer names (nodes, modules or aliases) into :class:`LayerSpec` records.

    Every name is checked before anything is returned.

    Raises:
        UnknownLayerError: a name is not storable; the message gives close matches.
    """
    declared("pool").check(pool)  # OptionError: the declaration's rule (options.py)
    declared("token_pool").check(token_pool)
    names = list(dict.fromkeys(names))
    if not names:
        raise UnknownLayerError("no layer requested; pass at least one --layer.")
    listing = listing or list_layers(backbone)
    if any(listing.get(n) is None for n in names):  # maybe a finer graph node
        listing = list_layers(backbone, all_nodes=True)
    specs = []
    for name in names:
        info = listing.get(name)
        if info is None:
            raise UnknownLayerError(
                f"layer {name!r} is not a storable layer of {backbone.name}; close matches: "
                f"{close_matches(name, listing.names())}. List them all with "
                f"`featurecache layers {backbone.name}`.")
        p = {"tokens": token_pool, "vector": "none"}.get(info.kind, pool)
        specs.append(LayerSpec(name, info.node or info.name, info.kind, p, info.width(pool),
                               info.depth, tuple(info.shape),
                               _reduction(info, backbone.preprocess.crop)))
    return specs
