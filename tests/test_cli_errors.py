"""Every ordinary mistake gets one line naming the problem and the fix, exit 1 (2 for usage
errors, as click does), and never a traceback: the console script, run as a user runs it."""

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from featurecache.heads import fit_head

from .conftest import make_image


def _cli(args, cwd):
    return subprocess.run([sys.executable, "-m", "featurecache.cli", *args], cwd=cwd,
                          capture_output=True)


@pytest.fixture
def world(tmp_path, image_folder, feats_path):
    """Inputs for the table: images, a feature file, a head, and broken versions of each."""
    import joblib
    import torch

    w = tmp_path / "w"
    w.mkdir()
    head = fit_head(feats_path, "avgpool", "logreg", cv=2, n_jobs=1)
    head.save(w / "head.joblib")
    data = joblib.load(w / "head.joblib")
    del data["pipeline_"]  # an edited head file
    joblib.dump(data, w / "tampered.joblib")
    (w / "junk.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    (w / "existing.h5").write_bytes(b"x")
    red = sorted((image_folder / "red").glob("*.png"))
    (w / "latin1.csv").write_bytes("path,label\n".encode() + f"{red[0]},caf\xe9\n".encode("latin-1"))
    (w / "dup.csv").write_text(f"path,label\n{red[0]},red\n{red[1]},red\n{red[0]},blue\n")
    (w / "nolabel.csv").write_text(f"path,label\n{red[0]},red\n{red[1]},\n")
    (w / "missing.csv").write_text(f"path,label\n{red[0]},red\ngone1.png,red\ngone2.png,blue\n")
    one = w / "one" / "only"
    one.mkdir(parents=True)
    for i in range(3):
        make_image(one / f"{i}.png", (200, 0, 0), i)
    (w / "gpu.toml").write_text(f'[data]\nroot = "{image_folder}"\n[embed]\ndevice = "gpu"\n'
                                f'[compare]\ncv = 2\n')
    (w / "nboot.toml").write_text(f'[data]\nroot = "{image_folder}"\n[compare]\nn_boot = 0\n')
    # a pipeline whose output already holds a feature file made with other settings
    (w / "run" ).mkdir()
    shutil.copyfile(feats_path, w / "run" / "features.h5")
    (w / "clash.toml").write_text(f'output = "run"\n[data]\nroot = "{image_folder}"\n'
                                  f'[embed]\nweights = "none"\n[compare]\ncv = 2\n')
    return w, image_folder, feats_path, red, torch.cuda.is_available()


@pytest.mark.slow
def test_a_table_of_bad_invocations(world):
    w, images, feats, red, has_gpu = world
    out = str(w / "out.h5")
    cases = [
        (["embed", str(images), "-o", out, "--device", "tpu"], 1, "'tpu' is not a device name"),
        (["predict", str(w / "tampered.joblib"), str(red[0])], 1,
         "damaged or edited featurecache head (it lacks pipeline_)"),
        (["info", str(w / "junk.h5")], 1, "junk.h5"),
        (["compare", str(feats), "--heads", ",", "-o", str(w / "r1")], 1, "no head kind given"),
        (["compare", str(feats), "--cv", "1", "-o", str(w / "r2")], 2, "Invalid value for '--cv'"),
        (["run", str(w / "nboot.toml")], 1, "compare.n_boot = 0 is out of range; it must be >= 1"),
        (["info", os.fsdecode(b"\xff.h5")], 1, "does not exist"),
        (["embed", os.fsdecode(b"\xffdir"), "-o", out], 1, "does not exist"),
        (["join", str(w / "existing.h5"), str(feats)], 1, "pass --overwrite"),
        (["run", str(w / "clash.toml")], 1, "or embed.overwrite = true to start over"),
        (["predict", str(w / "head.joblib"), str(red[0]), "-o", str(w / "nodir" / "p.csv")], 1,
         "output folder"),
        (["fit-head", "logreg", str(feats), "--layer", "avgpool", "-o",
          str(w / "nodir" / "h.joblib")], 1, "does not exist; create it first"),
        (["embed", str(w / "latin1.csv"), "-o", out], 1, "latin1.csv is not UTF-8 text"),
        (["embed", str(w / "dup.csv"), "-o", out], 1, "line 4: " + str(red[0]) + " is listed again"),
        (["embed", str(w / "nolabel.csv"), "-o", out], 1, "line 3: the label of"),
        (["embed", str(w / "missing.csv"), "-o", out], 1, "2 of 3 files do not exist"),
        (["embed", str(w / "one"), "-o", out], 1, "holds a single class ('only')"),
        (["embed", str(images), "-o", out, "--commit-every", "0"], 2, "--commit-every"),
        (["embed", str(images), "-o", out, "--layer", ","], 1, "no layer requested"),
    ]
    # an output that is one of the inputs is refused, whatever the flags
    cases += [
        (["predict", str(w / "head.joblib"), str(red[0]), "-o", str(w / "head.joblib")], 1,
         "is one of the inputs"),
        (["predict", str(w / "head.joblib"), str(w / "victim.png"), "-o", str(w / "victim.png")],
         1, "is one of the inputs"),
        (["fit-head", "logreg", str(feats), "--layer", "avgpool", "-o", str(feats)], 1,
         "is the feature file itself"),
        (["embed", str(w / "good.csv"), "-o", str(w / "good.csv"), "--overwrite"], 1,
         "is never replaced"),
        (["info", str(w / "head.joblib")], 1, "is not a feature file (not HDF5 at all)"),
        (["embed", str(red[0]), "-o", out], 1, "is an image; the data are a folder"),
        (["predict", str(feats), str(red[0])], 1, "is a feature file, not a head"),
        (["run", str(w / "nboot.toml"), "--set", "=3"], 1, "is not KEY=VALUE"),
        (["run", str(w / "gpu.toml"), "--dry-run"], 1, "device 'gpu' is not a device name"),
        (["run", str(w / "gpu.toml"), "--dry-run", "--set", "output=''"], 1, "output is empty"),
    ]
    if not has_gpu:
        cases.append((["embed", str(images), "-o", out, "--device", "cuda"], 1, "no CUDA GPU"))
    shutil.copyfile(red[1], w / "victim.png")
    (w / "good.csv").write_text(f"path,label\n{red[0]},red\n{red[1]},red\n"
                                f"{images / 'blue' / 'blue_0.png'},blue\n"
                                f"{images / 'blue' / 'blue_1.png'},blue\n")
    kept = {p: p.read_bytes() for p in (w / "head.joblib", w / "victim.png", w / "good.csv", feats)}
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda c: _cli(c[0], w), cases))
    for (args, code, fragment), res in zip(cases, results):
        err = res.stderr.decode("utf-8", "replace")
        assert res.returncode == code, (args, err[-1500:])
        assert fragment in err, (args, err[-1500:])
        assert "Traceback" not in err, (args, err[-1500:])
        if code == 1:
            assert err.startswith("Error: ") or "\nError: " in err, (args, err)
    assert not (w / "out.h5").exists() and not (w / "out.h5.partial").exists()
    assert not (w / "r1").exists() and not (w / "nodir").exists()
    assert all(p.read_bytes() == b for p, b in kept.items())  # no input was written over
    # the refused pipeline left the other file as it was
    assert (w / "run" / "features.h5").read_bytes() == feats.read_bytes()


@pytest.mark.slow
def test_a_name_with_brackets_is_a_file_not_a_pattern(world):
    w, images, feats, red, _ = world
    odd = w / "photo [1].png"
    shutil.copyfile(red[0], odd)
    (w / "photo 1.png").write_bytes(b"")  # what the pattern [1] would match
    res = _cli(["predict", str(w / "head.joblib"), str(odd), "--format", "json"], w)
    out = res.stdout.decode()
    assert res.returncode == 0, res.stderr.decode()
    assert "photo [1].png" in out and '"predicted": "red"' in out and "photo 1.png" not in out


def test_a_reader_that_goes_away_ends_the_command_quietly(feats_path):
    """Issue 22, item 15: `featurecache info F | head` ended with "Error: Broken pipe." and
    exit 1. The read end of the pipe is closed before the command starts: every write fails."""
    read, write = os.pipe()
    os.close(read)
    try:
        r = subprocess.run([sys.executable, "-m", "featurecache.cli", "info", str(feats_path)],
                           stdout=write, stderr=subprocess.PIPE, text=True)
    finally:
        os.close(write)
    assert r.returncode == 141 and r.stderr == "", r.stderr


@pytest.mark.slow
def test_a_file_of_a_finetune_folder_given_as_a_head_points_at_the_folder(feats_path, tmp_path):
    """Issue 22, item 15: `score ft/summary.json F` said "cannot read ... (KeyError: 123)"."""
    ft = tmp_path / "ft"
    ft.mkdir()
    (ft / "model.pt").write_bytes(b"")
    (ft / "summary.json").write_text("{}")
    r = subprocess.run([sys.executable, "-m", "featurecache.cli", "score", str(ft / "summary.json"),
                        str(feats_path)], capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "give the folder" in r.stderr and "model.pt" in r.stderr, r.stderr


def test_info_reads_the_partial_folder_it_names(image_folder, tiny_backbone, tmp_path,
                                                monkeypatch):
    """Issue 22, item 15: `info NAME.partial` said "is a directory", although info names an
    unfinished file that way."""
    from featurecache import embed
    from featurecache.store.writer import Writer

    close = Writer.close

    def stopped(self, complete=False):
        close(self, complete=False)
        if complete:
            raise RuntimeError("stopped")

    monkeypatch.setattr(Writer, "close", stopped)
    with pytest.raises(RuntimeError):
        embed(image_folder, tmp_path / "f.h5", backbone=tiny_backbone, layers=["avgpool"],
              num_workers=0, progress=False)
    r = subprocess.run([sys.executable, "-m", "featurecache.cli", "info",
                        str(tmp_path / "f.h5.partial")], capture_output=True, text=True)
    assert r.returncode == 0 and "INCOMPLETE" in r.stdout, r.stderr
    r = subprocess.run([sys.executable, "-m", "featurecache.cli", "info", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "is a folder, not a feature file" in r.stderr
