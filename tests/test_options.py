"""Options bound to signatures: one declaration per option (options.py) gives its default and
its rule; every stage function checks every declared argument on every call, whichever front
end (Python, the CLI, a pipeline file) made it."""

import ast
import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from featurecache import options
from featurecache.errors import OptionError, PipelineError
from featurecache.options import SIGNATURES, STAGES

STAGE_NAMES = sorted(SIGNATURES)


def _function(stage):
    module, _, name = SIGNATURES[stage].function.partition(":")
    return getattr(importlib.import_module(module), name)


def _same(a, b) -> bool:
    """Equal defaults; a tuple in a signature stands for the declaration's list."""
    norm = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
    return norm(a) == norm(b) and type(norm(a)) is type(norm(b))


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_every_signature_default_is_its_declaration(stage):
    fn = _function(stage)
    spec = SIGNATURES[stage]
    assert getattr(fn, "stage", None) == stage, f"{spec.function} is not @options.validated"
    params = inspect.signature(fn.__wrapped__).parameters
    named = {n for n, p in params.items() if p.kind is not p.VAR_KEYWORD}
    declared = {o.name for o in spec.options}
    assert len(declared) == len(spec.options), "an option declared twice"
    assert named == declared | set(spec.inputs), (
        f"{spec.function}: not declared {sorted(named - declared - set(spec.inputs))}, "
        f"declared but not taken {sorted((declared | set(spec.inputs)) - named)}")
    if spec.forwards:
        assert any(p.kind is p.VAR_KEYWORD for p in params.values())
    for o in spec.options:
        default = params[o.name].default
        assert default is not inspect.Parameter.empty, f"{stage}.{o.name} has no default"
        assert _same(default, o.default), \
            f"{spec.function}: {o.name}={default!r} but options.py declares {o.default!r}"


def test_the_walk_covers_every_stage_of_the_cli():
    assert {"embed", "embed_anywhere", "fit_head", "compare", "finetune", "predict",
            "predict_imagenet", "score", "layers", "join"} <= set(SIGNATURES)


def _bad(o):
    """A value outside the declaration: wrong type, unknown choice or out of range."""
    if o.type is list:
        return 5
    if o.choices:
        return "no-such-choice"
    if o.type is bool:
        return "yes"
    if o.type is str:
        return 5
    if o.low is not None:
        return o.low - 2  # (low - 1 is some keys' "auto")
    return "x"


CASES = [(stage, o) for stage in STAGE_NAMES for o in SIGNATURES[stage].options]


@pytest.mark.parametrize("stage,o", CASES, ids=[f"{s}.{o.name}" for s, o in CASES])
def test_a_bad_value_of_each_declared_option_is_refused_from_python(stage, o, tmp_path):
    fn = _function(stage)
    params = inspect.signature(fn.__wrapped__).parameters
    given = {n: str(tmp_path / n) for n, p in params.items()
             if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_KEYWORD,
                                                                       p.VAR_POSITIONAL)}
    with pytest.raises(OptionError):
        fn(**{**given, o.name: _bad(o)})
    assert not any(tmp_path.iterdir()), "something ran before the options were checked"


def test_a_good_value_passes_and_the_python_words_name_it():
    embed = SIGNATURES["embed"]
    embed.option("dtype").check("float32")
    with pytest.raises(OptionError, match="dtype = 'float8' is not allowed"):
        embed.option("dtype").check("float8")
    from featurecache.heads import fit_head

    with pytest.raises(OptionError, match="cv = 1 is out of range"):
        fit_head("f.h5", "avgpool", cv=1)
    with pytest.raises(TypeError):  # an unknown keyword is Python's error, as before
        fit_head("f.h5", "avgpool", folds=1)


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "featurecache.cli", *args], cwd=cwd,
                          capture_output=True, text=True)


@pytest.mark.parametrize("args,code,message", [
    (["embed", "builtin:digits", "-o", "f.h5", "--dtype", "float8"], 2, "'--dtype'"),
    (["embed", "builtin:digits", "-o", "f.h5", "--commit-every", "0"], 2, "'--commit-every'"),
    (["compare", "f.h5", "-o", "r", "--heads", "tree"], 1, "head 'tree' is not one of"),
    (["compare", "f.h5", "-o", "r", "--mlp-widths", "0"], 2, "[0] below 1"),
    (["predict", "h.joblib", "x.png", "--top-k", "0"], 2, "'--top-k'"),
    (["layers", "--pool", "median"], 2, "'--pool'"),
    (["finetune", "f.h5", "-o", "ft", "--val-fraction", "1"], 2, "'--val-fraction'"),
])
def test_a_bad_value_from_the_console_script_is_one_line(args, code, message, tmp_path):
    r = _cli(*args, cwd=tmp_path)
    assert r.returncode == code, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not any(tmp_path.iterdir())


TOML = [(table, o) for table, opts in STAGES.items() for o in opts]


def _toml(table, o):
    v = _bad(o)
    text = '[data]\nroot = "builtin:digits"\n' if (table, o.name) != ("data", "root") else ""
    value = f'"{v}"' if isinstance(v, str) else str(v)
    if table == "":
        return f"{o.toml_key} = {value}\n" + text
    if table == "data":
        return f'[data]\n{o.toml_key} = {value}\n' + ('root = "builtin:digits"\n'
                                                      if o.name != "root" else "")
    return text + f"[{table}]\n{o.toml_key} = {value}\n"


@pytest.mark.parametrize("table,o", TOML, ids=[f"{t or 'top'}.{o.toml_key}" for t, o in TOML])
def test_a_bad_value_of_each_pipeline_key_is_refused(table, o):
    from featurecache.pipeline import load_pipeline

    with pytest.raises(PipelineError) as caught:
        load_pipeline(text=_toml(table, o))
    assert isinstance(caught.value, OptionError)
    assert (f"{table}.{o.toml_key}" if table else o.toml_key) in str(caught.value)


def test_errors_is_a_leaf():
    tree = ast.parse(Path(options.__file__).with_name("errors.py").read_text())
    relative = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level]
    assert not relative, "errors.py imports from the package"
