"""Pipeline files: validation, dry runs of every shipped file, and the demo end to end."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from featurecache import embed
from featurecache.cli import cli
from featurecache.errors import PipelineError
from featurecache.pipeline import load_pipeline, run_pipeline
from featurecache.report import compare

from .conftest import SHARED

PIPELINES = sorted((Path(__file__).resolve().parents[1] / "pipelines").glob("*.toml"))


def test_there_are_pipelines_for_the_demo_every_shared_set_and_the_reference():
    names = {p.stem for p in PIPELINES}
    assert {"digits-demo", "reference", "digits", "lfw_faces", "clipart10"} <= names


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.stem)
def test_every_pipeline_file_passes_a_dry_run(path, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # paths in the files are relative to the file, not to here
    if "shared/data" in path.read_text() and not SHARED.is_dir():
        pytest.skip("shared data not present")
    r = CliRunner().invoke(cli, ["run", str(path), "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "inputs ok:" in r.output and "dry run: nothing was run." in r.output
    assert "1. embed" in r.output and "2. compare" in r.output


@pytest.mark.parametrize("text,match", [
    ('[data]\nroot = "builtin:digits"\n[embed]\nlayer = ["avgpool"]\n',
     r"unknown key 'embed.layer'.*close: layers"),
    ('[data]\nroot = "builtin:digits"\nmax_per_class = "ten"\n',
     r"data.max_per_class must be int, got str 'ten'"),
    ('[data]\nroot = "builtin:digits"\n[embed]\npool = "median"\n',
     r"embed.pool = 'median' is not allowed; choose one of avg, max, avgmax"),
    ('[embed]\nlayers = ["avgpool"]\n', r"missing key 'data.root'"),
    ('[data]\nroot = "builtin:digits"\n[embed]\nlayers = "avgpool"\n',
     r"embed.layers must be a list of strings"),
    ('[data]\nroot = "builtin:digits"\n[heads]\nx = 1\n', r"unknown table \[heads\]"),
    ('[data\nroot = 1', r"not valid TOML"),
])
def test_bad_pipeline_files_name_the_key(text, match):
    with pytest.raises(PipelineError, match=match):
        load_pipeline(text=text)


@pytest.mark.slow
@pytest.mark.parametrize("override,match,code", [
    ("data.root=no/such/folder", "does not exist", 1),
    ("embed.layers=['blocks.99']", r"'blocks.99' is not a storable layer.*close matches", 1),
    ("compare.layers=['stem']", r"compare layer 'stem' is not in embed.layers", 1),
    ("embed.backbone='resnet5'", "resnet50", 1),
])
def test_bad_inputs_are_caught_by_the_dry_run(override, match, code, tmp_path):
    (tmp_path / "p.toml").write_text('[data]\nroot = "builtin:digits"\n[embed]\nlayers = ["stage3", "avgpool"]\n')
    r = CliRunner().invoke(cli, ["run", str(tmp_path / "p.toml"), "--dry-run", "--set", override])
    assert r.exit_code == code, r.output
    import re

    assert re.search(match, r.output), r.output


@pytest.mark.slow
def test_demo_pipeline_end_to_end_matches_direct_calls(tmp_path, monkeypatch):
    demo = [p for p in PIPELINES if p.stem == "digits-demo"][0]
    out = tmp_path / "run"
    sets = ["data.max_per_class=6", f"output='{out}'", "compare.n_boot=200"]
    r = CliRunner().invoke(cli, ["run", str(demo), "-q", *[a for s in sets for a in ("--set", s)]])
    assert r.exit_code == 0, r.output
    record = json.loads((out / "run.json").read_text())
    assert set(record["timings"]) == {"embed_s", "compare_s"} and record["embed"]["rows"] == 120
    assert record["versions"]["featurecache"] and record["config"]["data"]["max_per_class"] == 6
    for key in ("features", "report", "plot", "best_head"):
        assert Path(record["outputs"][key]).is_file(), key
    # the same work through the plain functions gives the same winner and numbers
    plan = load_pipeline(demo, ["data.max_per_class=6"])
    c = plan.config
    direct = tmp_path / "direct.h5"
    embed("builtin:digits", direct, layers=c["embed"]["layers"], max_per_class=6, progress=False)
    res = compare(direct, tmp_path / "direct", heads=c["compare"]["heads"], n_boot=200,
                  n_jobs=c["compare"]["n_jobs"], progress=False)
    piped = json.loads((out / "report" / "results.json").read_text())
    assert piped["winner"]["layer"] == res.winner["layer"]
    assert piped["winner"]["head"] == res.winner["head"]
    for a, b in zip(piped["rows"], res.rows):
        assert (a["layer"], a["head"]) == (b["layer"], b["head"])
        assert a["balanced_accuracy"] == pytest.approx(b["balanced_accuracy"], abs=1e-9)
        assert a["cv_score"] == pytest.approx(b["cv_score"], abs=1e-9)
    assert res.winner["balanced_accuracy"] > 0.5  # 10 classes: chance is 0.1
    # a second run reuses the feature file instead of recomputing it
    again = run_pipeline(load_pipeline(demo, sets), progress=False)
    assert again["embed"]["reused"] is True
