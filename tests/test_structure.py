"""No global side effects and no leaks (issue 14): hooks removed, the caller's model left as it
was, no pyplot state; the CLI treats only featurecache's errors as user errors."""

import subprocess
import sys

import pytest
import torch

from featurecache.errors import HeadError, HeadOptionError, OptionError


@pytest.mark.slow
def test_hook_extraction_leaves_no_hooks_on_the_callers_model(tiny_backbone):
    from featurecache.extract import FeatureExtractor
    from featurecache.layers import resolve_layers

    model = tiny_backbone.model
    specs = resolve_layers(tiny_backbone, ["blocks.5", "avgpool"])
    count = lambda: sum(len(m._forward_hooks) for m in model.modules())
    before = count()
    ex = FeatureExtractor(model, specs, method="hooks")
    out = ex(torch.zeros(2, 3, 64, 64))
    assert {k: tuple(v.shape) for k, v in out.items()} == {"blocks.5": (2, 80), "avgpool": (2, 1280)}
    assert count() == before  # today's hooks stayed on the model for good
    fx = FeatureExtractor(model, specs, method="fx")(torch.zeros(2, 3, 64, 64))
    for k in out:
        torch.testing.assert_close(out[k], fx[k])


def test_the_callers_model_is_put_back(tiny_backbone, image_folder, tmp_path):
    from featurecache import embed

    model = tiny_backbone.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    embed(image_folder, tmp_path / "f.h5", backbone=tiny_backbone, layers=["avgpool"],
          num_workers=0, progress=False)
    assert next(model.parameters()).device.type == "cpu" and not model.training
    assert not any(len(m._forward_hooks) for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_plots_leave_no_pyplot_state(tmp_path):
    code = ("import sys, numpy as np; from featurecache.plots import plot_confusion; "
            "plot_confusion(sys.argv[1], np.eye(3, dtype=int) * 4, ['a', 'b', 'c'], "
            "{'layer': 'avgpool', 'head': 'logreg'}); print('matplotlib.pyplot' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "c.png")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False" and (tmp_path / "c.png").stat().st_size > 1000


def test_the_same_mistake_raises_the_same_type():
    from featurecache import embed
    from featurecache.errors import PipelineError
    from featurecache.layers import resolve_layers
    from featurecache.pipeline import load_pipeline
    from featurecache.search import check_options

    with pytest.raises(OptionError, match="dtype = 'float8' is not allowed"):
        embed("builtin:digits", "x.h5", dtype="float8")
    with pytest.raises(OptionError, match=r"test_size = 7.0 is out of range; it must be strictly "
                                          r"between 0 and 1"):
        embed("builtin:digits", "x.h5", test_size=7)
    with pytest.raises(OptionError, match=r"data.test_size = 7.0 is out of range") as caught:
        load_pipeline(text='[data]\nroot = "builtin:digits"\ntest_size = 7\n')
    assert isinstance(caught.value, PipelineError)
    with pytest.raises(TypeError):  # options are keyword-only
        embed("builtin:digits", "x.h5", "resnet18")
    with pytest.raises(OptionError, match="pool 'median'"):
        resolve_layers(None, ["avgpool"], pool="median")
    with pytest.raises(HeadOptionError, match="head 'tree'") as caught:
        check_options(["tree"])
    assert isinstance(caught.value, HeadError) and isinstance(caught.value, ValueError)


def test_an_unexpected_error_is_a_short_bug_report_with_debug_for_the_traceback(tmp_path):
    code = ("import sys, featurecache.store as st\n"
            "def boom(*a, **k):\n    raise TypeError('boom')\n"
            "st.open_features = boom\n"
            "from featurecache.cli import main\n"
            "sys.argv = ['featurecache'] + sys.argv[1:]\nmain()\n")
    plain = subprocess.run([sys.executable, "-c", code, "info", "x.h5"], capture_output=True,
                           text=True)
    assert plain.returncode == 1 and "Traceback" not in plain.stderr
    assert "internal error (TypeError: boom)" in plain.stderr and "--debug" in plain.stderr
    debug = subprocess.run([sys.executable, "-c", code, "--debug", "info", "x.h5"],
                           capture_output=True, text=True)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "TypeError: boom" in debug.stderr


def test_reference_toml_is_generated_from_the_declarations():
    from pathlib import Path

    from featurecache.options import STAGES, reference_toml
    from featurecache.pipeline import load_pipeline

    path = Path(__file__).resolve().parents[1] / "pipelines" / "reference.toml"
    assert path.read_text() == reference_toml(), "regenerate: python -c 'from featurecache." \
        "options import reference_toml; print(reference_toml(), end=\"\")' > pipelines/reference.toml"
    plan = load_pipeline(path)
    for table, options in STAGES.items():  # every declared key is in the file, and only those
        assert set(plan.config[table]) == {o.toml_key for o in options}


def test_the_cli_options_come_from_the_declarations():
    import click

    from featurecache.cli import cli
    from featurecache.options import EMBED

    params = {p.name: p for p in cli.commands["embed"].params}
    for o in EMBED:
        if o.type is list:
            continue
        p = params[o.name]
        assert p.default == o.default and p.opts == [o.flag]
        if o.choices:
            assert tuple(p.type.choices) == o.choices
    assert isinstance(params["batch_size"].type, click.IntRange) and params["batch_size"].type.min == 1
    compare = {p.name: p for p in cli.commands["compare"].params}
    assert compare["cv"].type.min == 2 and compare["n_boot"].type.min == 1


@pytest.mark.slow
def test_layer_specs_record_shape_and_reduction(tiny_backbone, tmp_path):
    import h5py

    from featurecache import embed, open_features
    from featurecache.layers import resolve_layers

    specs = {s.name: s for s in resolve_layers(tiny_backbone, ["stem", "blocks.5", "head"])}
    x = torch.zeros(1, 3, 64, 64)  # the spec must match a real forward pass at 64 px
    model = tiny_backbone.model
    assert tuple(model.stem(x).shape[1:]) == specs["stem"].shape == (32, 32, 32)
    assert specs["stem"].reduction == 2 and specs["blocks.5"].reduction == 16
    out = tmp_path / "f.h5"
    embed("builtin:digits", out, backbone=tiny_backbone, layers=["stem", "avgpool"],
          max_per_class=1, num_workers=0, progress=False)
    assert open_features(out).layers["stem"] == specs["stem"]
    with h5py.File(out, "r+") as f:  # a file from before these attributes
        for name in ("shape", "reduction"):
            del f["layers/stem"].attrs[name]
    old = open_features(out).layers["stem"]
    assert old.shape == () and old.reduction == 0 and old.dim == 32
