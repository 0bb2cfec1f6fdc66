"""Every option of every stage, declared once: name, type, default, choices, range and help.

From these declarations the stage functions validate their arguments (:func:`check`), the
click options of the CLI are built (:func:`click_options`), the pipeline loader checks keys,
types and ranges (:func:`featurecache.pipeline.load_pipeline`), and
``pipelines/reference.toml`` is generated (:func:`reference_toml`; a test keeps the committed
file equal to it). To add an option: add an :class:`Option` here and use it in the function
of its stage (see the README's "Adding an option").

This module imports nothing heavy: ``featurecache --help`` reads it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from . import kinds as _kinds  # no numpy, no scikit-learn
from .errors import HeadOptionError, OptionError
from .scoring import SCORINGS  # a leaf: no numpy, no scikit-learn

__all__ = ["Option", "DATA", "EMBED", "COMPARE", "CLUSTER", "FINETUNE", "TOP", "STAGES", "check", "click_options",
           "Stage", "SIGNATURES", "validated", "declared", "PREDICT", "SCORE", "LAYERS", "JOIN",
           "SEED", "OVERWRITE", "KIND",
           "reference_toml", "class_weight", "FIT_HEAD", "FIT_HEAD_SHARED", "DEFAULT_BACKBONE", "POOLS", "TOKEN_POOLS", "DTYPES", "ON_ERROR",
           "HEAD_KINDS", "EXPORT", "DENSE", "DENSE_HEADS", "KERNELS", "SCORINGS", "SELECT", "CLASS_WEIGHTS"]

DEFAULT_BACKBONE = "efficientnet_lite0"
POOLS = ("avg", "max", "avgmax")
TOKEN_POOLS = ("cls", "mean")
DTYPES = ("float16", "float32")
ON_ERROR = ("skip", "fail")
HEAD_KINDS = _kinds.NAMES  # the head-kind registry's names, live (featurecache.kinds)
KERNELS = ("linear", "rbf")
SELECT = ("cv", "cv-1se")
CLASS_WEIGHTS = ("none", "balanced")
_UNSET = object()


@dataclass(frozen=True)
class Option:
    """One option of one stage.

    ``name`` is the Python keyword; ``key`` the pipeline key and CLI flag (``--key`` with
    dashes) when they differ. TOML has no null: an option whose default is None (meaning
    "choose for me") is written as ``auto`` in a pipeline file (0, -1 or ""). ``low``/``high``
    bound numbers (``open``: the bounds themselves are excluded).
    """

    name: str
    type: type
    default: object
    help: str
    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    open: bool = False
    auto: object = _UNSET
    key: str = ""
    example: object = _UNSET  # the value reference.toml shows, when not the default
    items: tuple = (str,)     # types of a list's items
    auto_means: str = "auto"  # what ``auto`` stands for, in reference.toml
    excluded: tuple = ()      # values inside the range that mean nothing (n_jobs = 0)
    cli: str = ""             # the CLI flag's name, when not the pipeline key
    nullable: bool = False    # None is taken too (from Python), meaning the default's choice
    objects: tuple = ()       # class names of objects taken instead (a loaded Backbone)
    noun: str = ""            # a choice outside its choices reads "NOUN 'x' is not one of ..."
    error: type = OptionError  # the type raised for a bad value (a subclass of OptionError)

    @property
    def toml_key(self) -> str:
        return self.key or self.name

    @property
    def flag(self) -> str:
        return "--" + (self.cli or self.toml_key).replace("_", "-")

    @property
    def toml_default(self):
        return self.auto if self.default is None and self.auto is not _UNSET else self.default

    def from_toml(self, value):
        """A pipeline value as the function takes it (``auto`` -> None)."""
        return None if self.auto is not _UNSET and value == self.auto else value

    def check(self, value, where: str = ""):
        """Return ``value`` if it is allowed, else raise :class:`OptionError` naming it."""
        named = where or self.name
        error = self.error
        if value is None and (self.default is None or self.nullable):
            return value
        if self.objects and any(c.__name__ in self.objects for c in type(value).__mro__):
            return value
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if self.type is list:
            if isinstance(value, tuple):
                value = list(value)
            if not isinstance(value, list) or not all(isinstance(v, self.items) and
                                                      not isinstance(v, bool) for v in value):
                kinds = " or ".join("numbers" if t is int else "strings" for t in self.items)
                raise error(f"{named} must be a list of {kinds}, got {value!r}.")
            small = [v for v in value if self.low is not None and v < self.low]
            if small:
                raise error(f"{named}: {small} below {self.low:g}; each must be "
                            f"{self._range()}.")
            bad = [v for v in value if self.choices and v not in self.choices]
            if bad and self.noun and not where:
                raise error(self._not_one_of(bad[0]))
            if bad:
                raise error(f"{named}: {bad} not known; choose from "
                            f"{', '.join(self.choices)}.")
            return value
        if self.type is dict and not isinstance(value, dict):
            raise error(f"{named} must be a table of option names (JSON object), got "
                        f"{type(value).__name__}.")
        if not isinstance(value, self.type) or (self.type is not bool and isinstance(value, bool)):
            raise error(f"{named} must be {self.type.__name__}, got "
                        f"{type(value).__name__} {value!r}.")
        if self.type is float and not math.isfinite(value):
            raise error(f"{named} = {value!r} is not a finite number.")
        where_ = f"{named} = {value!r}"
        if value in self.excluded:
            raise error(f"{where_} is not allowed; {self.help}.")
        if self.choices and value not in self.choices:
            if self.noun and not where:
                raise error(self._not_one_of(value))
            raise error(f"{where_} is not allowed; choose one of "
                        f"{', '.join(self.choices)}.")
        below = self.low is not None and (value <= self.low if self.open else value < self.low)
        above = self.high is not None and (value >= self.high if self.open else value > self.high)
        if below or above:
            raise error(f"{where_} is out of range; it must be {self._range()}.")
        return value

    def _not_one_of(self, value) -> str:
        return f"{self.noun} {value!r} is not one of {', '.join(self.choices)}."

    def _range(self) -> str:
        if self.low is not None and self.high is not None:
            word = "strictly between" if self.open else "between"
            return f"{word} {self.low:g} and {self.high:g}"
        if self.low is not None:
            return f"{'>' if self.open else '>='} {self.low:g}"
        return f"{'<' if self.open else '<='} {self.high:g}"


# [top level] of a pipeline file
TOP = (
    Option("name", str, "", "shown in the plan", example="reference"),
    Option("description", str, "", "free text", example="all the options"),
    Option("output", str, "runs/experiment", "folder for features.h5, report/ and run.json",
           example="../runs/reference"),
    Option("seed", int, 0, "seeds the train/test split, the CV folds and the bootstrap"),
)
# [data]: where the images are (embed's source and split)
DATA = (
    Option("root", str, _UNSET, "REQUIRED: image folder, CSV manifest (path,label[,split]) or "
           "builtin:digits", example="builtin:digits"),
    Option("test_size", float, 0.3, "test share per class, when the data give no split",
           low=0, high=1, open=True),
    Option("max_per_class", int, None, "keep at most N images per class and split (quick runs)",
           low=1, auto=0, auto_means="all"),
    Option("storage_options", dict, None, "fsspec options for a URL root (a table; on the "
           "CLI JSON): endpoint_url, profile, anon...; keys come from the environment and are "
           "never recorded", auto="", auto_means="none"),
    Option("label_field", str, None, "tar shards: the field of a sample's KEY.json that holds "
           "its label (a string or an integer) when it has no KEY.cls or KEY.txt", auto="",
           auto_means="none"),
)
# [embed]
EMBED = (
    Option("backbone", str, DEFAULT_BACKBONE, "any name from `featurecache backbones`",
           objects=("Backbone",)),
    Option("weights", str, "DEFAULT", "DEFAULT, a weights-enum name (IMAGENET1K_V2) or none",
           nullable=True),
    Option("weights_file", str, None, "a local .pth state dict instead of `weights`", auto="",
           auto_means="none"),
    Option("layers", list, ["avgpool"], "names or aliases from `featurecache layers BACKBONE`",
           example=["stage3", "avgpool"], cli="layer"),
    Option("pool", str, "avg", "pooling of feature maps", choices=POOLS, noun="pool"),
    Option("keep_map", list, [], "layers whose unpooled feature map is also stored, one image "
           "per chunk (the input of the blocks above it, for fine-tuning)", example=[]),
    Option("map_size", int, None, "average-pool the stored maps down to SxS (auto: as they are)",
           low=1, auto=0),
    Option("token_pool", str, "cls", "pooling of token sequences (ViT)", choices=TOKEN_POOLS,
           noun="token pool"),
    Option("dtype", str, "float16", "storage type", choices=DTYPES),
    Option("batch_size", int, None, "images per forward pass (auto: 16 on CPU, 64 on GPU)",
           low=1, auto=0),
    Option("num_workers", int, None, "decode workers (auto: CPU count, at most 8)", low=0,
           auto=-1, key="workers"),
    Option("device", str, None, "cpu or cuda (auto: cuda when present)", auto=""),
    Option("compile", bool, False, "torch.compile the forward first (a one-off cost, "
           "reported; cached for later runs)"),
    Option("on_error", str, "skip", "unreadable images: skip (log them in the file) or fail",
           choices=ON_ERROR),
    Option("commit_every", float, 30.0, "seconds between commits (also every 512 rows)",
           low=0, open=True),
    Option("overwrite", bool, False, "start over instead of resuming a file made with other "
           "settings"),
    Option("update", bool, False, "bring an existing file up to date with the data: embed "
           "only new and changed images, copy the unchanged rows, drop deleted ones"),
)
# [compare]
COMPARE = (
    Option("heads", list, list(_kinds.defaults()), "head kinds", choices=HEAD_KINDS,
           noun="head", error=HeadOptionError),
    Option("layers", list, [], "stored layers to compare (empty: all)", nullable=True),
    Option("extra_layers", list, [], "concatenations such as blocks.5+avgpool, each its own row",
           example=["stage3+avgpool"], cli="extra"),
    Option("kernel", str, "linear", "svm kernel", choices=KERNELS, noun="kernel",
           error=HeadOptionError),
    Option("mlp_widths", list, [256, 1024], "hidden-layer widths the mlp head searches (with "
           "its alpha)", items=(int,), low=1),
    Option("cv", int, 5, "stratified CV folds on the train split", low=2),
    Option("scoring", str, "balanced_accuracy", "CV score that picks heads and the winner",
           choices=SCORINGS, noun="scoring", error=HeadOptionError),
    Option("select", str, "cv", "cv: best CV score; cv-1se: simplest within one standard error",
           choices=SELECT, noun="select", error=HeadOptionError),
    Option("shots", list, [], "few-shot curve, e.g. [1, 5, 10, \"all\"] images per class",
           items=(int, str)),
    Option("repeats", int, 3, "seeded draws per few-shot size", low=1),
    Option("class_weight", str, "none", "class weights of the heads", choices=CLASS_WEIGHTS,
           nullable=True),
    Option("n_jobs", int, -1, "parallel CV tasks (layers x folds): a count, or -1 for all "
           "cores", excluded=(0,)),
    Option("n_boot", int, 1000, "bootstrap resamples for the 95% intervals", low=1),
    Option("max_head_minutes", float, 10.0, "skip a head on a layer where its search is "
           "estimated above this many minutes on 2 cores (rbf svm, mlp and knn: cost models "
           "measured by benchmarks/head_costs.py; the linear heads are never skipped); 0: "
           "never skip", low=0),
)
# segment / detect: the dense probes (not pipeline tables)
DENSE_HEADS = ("logreg", "knn")  # featurecache.dense.heads' registry (a test keeps them equal)
DENSE = (
    Option("layers", list, [], "stored maps to probe (empty: every stored map)", nullable=True),
    Option("hypercolumn", list, ["auto"], "hypercolumns, each its own row: a+b+c (maps "
           "upsampled to the finest grid and concatenated); auto: the deepest two and the "
           "deepest three maps together; none: no hypercolumn", example=["stage3+stage4+stage5"]),
    Option("heads", list, list(DENSE_HEADS), "cell heads", choices=DENSE_HEADS, noun="head",
           error=HeadOptionError),
    Option("n_cells", int, 30000, "training cells sampled per probe (the same number from "
           "each image, seeded)", low=100),
    Option("cv", int, 3, "CV folds grouped by image on the training images", low=2),
)
# [cluster]: where embed (sharded) and compare (the CV fits) run; absent: in this process
CLUSTER = (
    Option("cluster", str, None, "Dask cluster: local, local:N (N worker processes), local-cuda "
           "(one worker per GPU, needs dask-cuda) or a scheduler address tcp://host:8786",
           auto="", key="address", cli="cluster", auto_means="in this process, no cluster"),
    Option("shards", int, None, "shard files of a clustered embed (auto: the count already in "
           "OUTPUT.shards/, else 4 per worker)", low=1, auto=0),
    Option("copy", bool, False, "join the shards into one self-contained file (default: "
           "virtual datasets pointing into OUTPUT.shards/)"),
)

# [finetune]: LP-FT of the blocks above a stored map (pipelines run it when `sources` names one)
FINETUNE = (
    Option("sources", list, [], "fine-tune from: \"cache\" (the map embed.keep_map stored) "
           "and/or \"images\" (decoded again, with augment); empty: no fine-tuning",
           choices=("cache", "images"), example=[]),
    Option("from_layer", str, "stage4", "the layer whose map feeds the unfrozen blocks above "
           "it (from a feature file: a map kept with keep_map)", key="from"),
    Option("augment", bool, False, "from images: random resized crops and flips"),
    Option("epochs", int, 5, "most epochs (the best on the validation fold is kept)", low=1),
    Option("lr", float, 1e-3, "the classifier's Adam learning rate (the blocks get a tenth), "
           "after a warm-up over the first epoch",
           low=0, open=True),
    Option("weight_decay", float, 0.01, "decoupled weight decay towards the starting weights "
           "(the pretrained blocks and the probe: L2-SP), per unit of learning rate", low=0),
    Option("batch_size", int, 32, "maps (or images) per step", low=1),
    Option("val_fraction", float, 0.2, "share of each class's training rows held out to pick "
           "the epoch (a val split, when the data have one, is used instead)", low=0, high=1,
           open=True),
    Option("patience", int, 2, "stop after this many epochs without a better validation "
           "score", low=1),
    Option("refit", str, "all", "all: retrain on every training row (validation fold "
           "included) for the chosen number of epochs; none: keep the chosen epoch's model",
           choices=("all", "none")),
)

# fit-head's own options (with kernel, cv, scoring, class_weight and n_jobs of COMPARE);
# not a pipeline table: pipelines fit heads through compare
FIT_HEAD = (
    Option("probability", bool, False, "fit SVM probability estimates (sigmoid, by CV; slower)"),
    Option("seed", int, 0, "seeds the CV folds"),
)
FIT_HEAD_SHARED = ("kernel", "cv", "scoring", "class_weight", "n_jobs", "mlp_widths")
STAGES = {"": TOP, "data": DATA, "embed": EMBED, "compare": COMPARE, "finetune": FINETUNE,
          "cluster": CLUSTER}


def _named(options, *names) -> tuple:
    """The declarations of ``names``, in that order (one declaration, used by several stages)."""
    by_name = {o.name: o for o in options}
    return tuple(by_name[n] for n in names)


def _as(o: Option, **changes) -> Option:
    """The same declaration in another stage's words (its help there; rarely its default)."""
    return replace(o, **changes)


# Options that are not keys of a pipeline table: the CLI's and Python's only.
SEED = _named(TOP, "seed")[0]
OVERWRITE = Option("overwrite", bool, False, "replace an existing output")
KIND = Option("kind", str, "logreg", "the head kind", choices=HEAD_KINDS, noun="head",
              error=HeadOptionError)
WEIGHTS = _named(EMBED, "weights")[0]
# [predict]: classify images with a saved head, a fine-tuned model or the ImageNet head
PREDICT = (
    _as(_named(EMBED, "backbone")[0], help="with --imagenet"),
    _as(WEIGHTS, help="with --imagenet"),
    _named(EMBED, "weights_file")[0],
    Option("top_k", int, 3, "classes per image, best first", low=1),
    Option("batch_size", int, 32, "images per forward pass", low=1),
    _named(EMBED, "device")[0],
    Option("num_workers", int, 0, "decode workers (0: in this process)", low=0, key="workers"),
    Option("fmt", str, "csv", "output format", choices=("csv", "json"), cli="format"),
)
SCORE = (Option("split", str, "test", "split of the file to score"),)
LAYERS = (
    _as(_named(EMBED, "backbone")[0], help="the backbone whose layers are listed"),
    _as(WEIGHTS, default="none", nullable=True,
        help="weights to load (shapes do not depend on them; none is fastest)"),
    Option("all_nodes", bool, False, "also list every FX graph node, not just modules",
           cli="all"),
    _as(_named(EMBED, "pool")[0], help="pooling the widths are computed for"),
)
# export: a saved model with its backbone as one file
EXPORT = (
    Option("opset", int, None, "ONNX opset version (auto: the exporter's default)", low=18,
           auto=0),
    Option("skip_check", bool, False, "do not run the written file on random images "
           "against the model"),
)
JOIN = (
    _as(_named(CLUSTER, "copy")[0], help="copy the layers into OUTPUT: one self-contained file"),
    _as(OVERWRITE, help="replace an existing output file"),
)


@dataclass(frozen=True)
class Stage:
    """The options of one stage function: ``function`` (``module:name``) takes one keyword per
    declaration in ``options``, with the declared default, and ``inputs`` besides (the data,
    paths and callbacks that are not options). :func:`validated` checks every declared one on
    every call; a test keeps the signature and the declarations equal."""

    function: str
    options: tuple
    inputs: tuple = ()
    forwards: str = ""  # the stage whose options its ``**kw`` are (checked as that one's)

    def option(self, name: str) -> Option:
        return next(o for o in self.options if o.name == name)

    def only(self, *names) -> tuple:
        return _named(self.options, *names)


_FROM_IMAGES = _named(EMBED, "backbone", "weights", "weights_file", "device", "num_workers") + \
    _named(DATA, "test_size", "max_per_class")
SIGNATURES = {
    "embed": Stage("featurecache.embedding:embed",
                   _named(DATA, "test_size", "max_per_class", "storage_options",
                          "label_field") + EMBED
                   + (_as(SEED, help="seed of the split"),
                      Option("commit_rows", int, 512, "rows between commits", low=1)),
                   inputs=("source", "output", "shard", "progress")),
    # featurecache.embed: the embed loop here, or in shards on a cluster
    "embed_anywhere": Stage("featurecache.cluster:embed", CLUSTER, inputs=("source", "output"),
                            forwards="embed"),
    "fit_head": Stage("featurecache.heads:fit_head",
                      (KIND,) + _named(COMPARE, *FIT_HEAD_SHARED) + FIT_HEAD,
                      inputs=("features", "layer", "progress")),
    "compare": Stage("featurecache.report:compare",
                     COMPARE + _named(CLUSTER, "cluster")
                     + (_as(SEED, help="seeds the CV folds, the bootstrap and the few-shot "
                                      "draws"),
                        _as(OVERWRITE, help="replace an existing report folder")),
                     inputs=("features", "out_dir", "finetuned", "progress")),
    "finetune": Stage("featurecache.finetune:finetune",
                      tuple(o for o in FINETUNE if o.name != "sources")
                      + (_as(_named(COMPARE, "scoring")[0],
                             help="validation score that picks the epoch"),
                         _as(SEED, help="seeds the validation fold and the shuffles (and, "
                                        "from images, the train/test split when the data "
                                        "have none: use embed's seed to compare)"),
                         _as(OVERWRITE, help="replace the files of an earlier fine-tune"))
                      + _FROM_IMAGES,
                      inputs=("source", "output", "progress")),
    "predict": Stage("featurecache.predict:predict",
                     _named(PREDICT, "top_k", "batch_size", "device", "num_workers"),
                     inputs=("head", "images")),
    "predict_imagenet": Stage("featurecache.predict:predict_imagenet",
                              _named(PREDICT, "backbone", "weights", "weights_file", "top_k",
                                     "batch_size", "device"),
                              inputs=("images",)),
    "write_predictions": Stage("featurecache.predict:write_predictions",
                               _named(PREDICT, "fmt"), inputs=("rows", "dest")),
    "score": Stage("featurecache.predict:score", SCORE, inputs=("head", "features")),
    "segment": Stage("featurecache.dense.segment:segment",
                     DENSE + (_as(_named(COMPARE, "n_jobs")[0], help="parallel CV fits "
                                  "(class weights x folds): a count, or -1 for all cores"),)
                     + _named(COMPARE, "n_boot")
                     + (_as(SEED, help="seeds the cell sample and the bootstrap"),
                        _as(OVERWRITE, help="replace an existing report folder")),
                     inputs=("features", "out_dir", "progress")),
    "detect": Stage("featurecache.dense.detect:detect",
                    _named(DENSE, "layers", "hypercolumn")
                    + (_as(_named(DENSE, "heads")[0], default=["logreg"]),)
                    + _named(DENSE, "n_cells", "cv")
                    + (_as(_named(COMPARE, "n_jobs")[0], help="parallel CV fits (class "
                           "weights x folds): a count, or -1 for all cores"),)
                    + (_as(SEED, help="seeds the cell sample"),
                       _as(OVERWRITE, help="replace an existing report folder")),
                    inputs=("features", "out_dir", "progress")),
    "export": Stage("featurecache.export:export", EXPORT, inputs=("model", "output")),
    "layers": Stage("featurecache.layers:describe_layers", LAYERS),
    "join": Stage("featurecache.store:join_shards", JOIN,
                  inputs=("shards", "output", "rebuild")),
}


def declared(name: str):
    """The declaration of keyword ``name`` (its CLI flag and pipeline key may differ from it),
    for naming it in messages; None when nothing declares it."""
    for options in (*STAGES.values(), *(s.options for s in SIGNATURES.values())):
        for o in options:
            if o.name == name:
                return o
    return None


def validated(stage: str):
    """Bind a stage function to its declarations (``SIGNATURES[stage]``), as scikit-learn's
    ``validate_params`` does: every call binds the arguments to the signature, defaults
    applied, and checks every declared one, whichever front end made the call.

    Raises (from the decorated function):
        OptionError: naming the option, the value and what is allowed (nothing has run).
    """
    import functools
    import inspect

    spec = SIGNATURES[stage]
    declarations = spec.options
    forwarded = {o.name: o for o in SIGNATURES[spec.forwards].options} if spec.forwards else {}

    def decorate(fn):
        signature = inspect.signature(fn)
        rest = next((p.name for p in signature.parameters.values()
                     if p.kind is p.VAR_KEYWORD), None)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)  # TypeError for a wrong call, as Python's
            bound.apply_defaults()
            arguments = bound.arguments
            for o in declarations:
                if o.name in arguments:
                    o.check(arguments[o.name])
            for name, value in (arguments.get(rest, {}) if forwarded else {}).items():
                if name in forwarded:  # an unknown one is the callee's TypeError
                    forwarded[name].check(value)
            return fn(*args, **kwargs)

        wrapper.stage = stage
        return wrapper

    return decorate


def class_weight(value):
    """The class-weight choice as scikit-learn takes it: ``"none"`` -> None."""
    return None if value in (None, "none") else value


def check(options, values: dict) -> None:
    """Validate the given keyword arguments against their declarations.

    Raises:
        OptionError: naming the option, the value and what is allowed.
    """
    by_name = {o.name: o for o in options}
    for name, value in values.items():
        if name in by_name:
            by_name[name].check(value)


def click_options(options, skip=(), only=None):
    """A decorator adding one click option per declaration (type, choices, range, default,
    help), in declaration order; ``skip`` names the ones the command declares itself, ``only``
    the ones it takes (default: all). A list is repeatable and comma-separated
    (``--layer stage3 --layer avgpool``, ``--mlp-widths 256,1024``); its items' types and range
    are checked here, their choices by the stage function."""
    import click

    def list_of(o):
        unchecked = replace(o, choices=())

        def item(v):
            for t in o.items:
                try:
                    return t(v)
                except ValueError:
                    continue
            raise ValueError(f"{o.flag}: {v!r} is not a {o.items[0].__name__}.")

        def parse(ctx, param, value):
            if not value:
                return list(o.default)
            try:
                items = [item(v.strip()) for given in value for v in given.split(",")
                         if v.strip()]
                return unchecked.check(items, o.flag)
            except (ValueError, OptionError) as exc:
                raise click.BadParameter(str(exc)) from None
        return parse

    def json_object(o):
        def parse(ctx, param, value):
            import json

            if value in (None, ""):
                return None
            try:
                parsed = json.loads(value)
            except ValueError as exc:  # never echo the value: it may hold a key
                raise click.BadParameter(f"not JSON ({exc.msg} at character {exc.pos}); give "
                                         f"an object such as '{{\"endpoint_url\": "
                                         f"\"http://host:9000\"}}'.") from None
            if not isinstance(parsed, dict):
                raise click.BadParameter(f"must be a JSON object, got {type(parsed).__name__}.")
            return parsed
        return parse

    def decorate(fn):
        for o in reversed(options):
            if o.name in skip or (only is not None and o.name not in only):
                continue
            kw = {"default": o.default, "help": o.help + ".",
                  "show_default": o.default is not None}
            if o.type is list:
                kw.update(default=tuple(map(str, o.default)), multiple=True,
                          callback=list_of(o), help=o.help + (f" ({', '.join(o.choices)})"
                                                              if o.choices else "")
                          + " (repeat, or comma-separate).",
                          show_default=bool(o.default))
            elif o.type is bool:
                kw.update(is_flag=True, show_default=False)
            elif o.type is dict:  # a JSON object on the command line
                kw.update(type=str, metavar="JSON", callback=json_object(o), show_default=False,
                          help=o.help + ", e.g. '{\"endpoint_url\": \"http://127.0.0.1:9000\"}'.")
            elif o.choices:
                kw["type"] = click.Choice(list(o.choices))
            elif o.type in (int, float) and (o.low is not None or o.high is not None):
                rng = click.IntRange if o.type is int else click.FloatRange
                kw["type"] = rng(min=o.low, max=o.high, min_open=o.open, max_open=o.open) \
                    if o.type is float else rng(min=o.low, max=o.high)
            else:
                kw["type"] = o.type
            fn = click.option(o.flag, o.name, **kw)(fn)
        return fn

    return decorate


def reference_toml() -> str:
    """The text of ``pipelines/reference.toml``: every key of every table with its default
    (or an example) and its help."""
    import json

    def value(o):
        v = o.example if o.example is not _UNSET else o.toml_default
        return str(v).lower() if isinstance(v, bool) else json.dumps(v)

    lines = ["# Every key a pipeline file takes, with its default. Unknown keys are errors.",
             "# Generated from featurecache/options.py (a test keeps this file equal to it).",
             "# Relative paths in a pipeline file are relative to the file's folder (those given "
             "with --set:", "# to the current folder).",
             "# Check a file without running it:   featurecache run pipelines/reference.toml "
             "--dry-run", ""]
    for table, options in STAGES.items():
        if table:
            lines += ["", f"[{table}]"]
        for o in options:
            help_ = o.help
            if o.choices:
                help_ += f": {' | '.join(o.choices)}"
            if o.auto is not _UNSET:
                help_ += f"; {json.dumps(o.auto)} = {o.auto_means}"
            lines.append(f"{o.toml_key} = {value(o)}".ljust(38) + f"# {help_}")
    return "\n".join(lines) + "\n"
