"""The click layer: exit codes, key output lines, help with examples."""

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from featurecache.cli import cli


@pytest.fixture
def runner():
    return CliRunner()


def test_help_teaches_with_examples(runner):
    for cmd in ([], ["embed"], ["layers"], ["info"]):
        r = runner.invoke(cli, cmd + ["--help"])
        assert r.exit_code == 0, r.output
    assert "featurecache embed" in runner.invoke(cli, ["embed", "--help"]).output
    assert "Example" in runner.invoke(cli, ["info", "--help"]).output


def test_layers_lists_names_kinds_widths(runner):
    r = runner.invoke(cli, ["layers", "efficientnet_lite0", "--json"])
    assert r.exit_code == 0, r.output
    rows = {row["name"]: row for row in json.loads(r.output)["layers"]}
    assert rows["avgpool"]["width"] == 1280 and rows["blocks.10"]["aliases"] == ["stage4"]
    table = runner.invoke(cli, ["layers"]).output
    assert "blocks.10" in table and "stage4" in table and "storable layers" in table


@pytest.mark.slow
def test_embed_then_info(runner, image_folder, tmp_path):
    out = tmp_path / "f.h5"
    args = ["embed", str(image_folder), "-o", str(out), "--layer",
            "blocks.5,avgpool", "--workers", "0", "--batch-size", "6", "-q", "--max-per-class", "2"]
    r = runner.invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert "12 rows x 2 layers" in r.output and "avgpool[1280]" in r.output
    r = runner.invoke(cli, args)
    assert r.exit_code == 0 and "already complete" in r.output
    r = runner.invoke(cli, ["info", str(out)])
    assert r.exit_code == 0, r.output
    assert "complete" in r.output and "rows: 12" in r.output and "blocks.5" in r.output
    assert "rebuild: featurecache embed" in r.output


@pytest.mark.slow
@pytest.mark.parametrize("args,code,message", [
    (["embed", "builtin:digits", "-o", "{tmp}/f.h5", "--layer", "blocks.99", "--weights", "none"], 1,
     "close matches: blocks.9"),
    (["embed", "builtin:digits", "-o", "{tmp}/no/f.h5"], 1, "does not exist; create it first"),
    (["embed", "builtin:digits", "-o", "{tmp}/f.h5", "--backbone", "resnt50"], 1, "resnet50"),
    (["embed", "builtin:digits", "-o", "{tmp}/f.h5", "--pool", "median"], 2, "Invalid value for '--pool'"),
    (["embed", "builtin:digits", "-o", "{tmp}/f.h5", "--shard", "two"], 2, "INDEX/COUNT"),
    (["info", "{tmp}/missing.h5"], 1, "does not exist; make it with `featurecache embed`"),
])
def test_bad_input_exit_codes(tmp_path, args, code, message):
    # the console script as a user runs it: CliRunner catches every exception itself and
    # never prints a traceback, so only a real process shows whether one escapes
    r = subprocess.run([sys.executable, "-m", "featurecache.cli",
                        *(a.replace("{tmp}", str(tmp_path)) for a in args)],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == code, r.stderr[-1500:]
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr[-1500:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and message in errors[0], r.stderr  # one line names the problem
