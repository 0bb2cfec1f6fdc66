"""No silent wrong answers and no lost outputs (issue 11): each test fails on the code before."""

import json
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from featurecache import embed, load_backbone, open_features
from featurecache.errors import DataWarning, HeadError, StoreError
from featurecache.heads import Head, fit_head, load_head, refit
from featurecache.predict import predict
from featurecache.report import compare
from featurecache.store import join_shards, partial_path

from .conftest import make_image


def cli(*args, cwd=None):
    """The console script in a subprocess: (exit code, stdout, stderr)."""
    out = subprocess.run([sys.executable, "-m", "featurecache.cli", *map(str, args)],
                         capture_output=True, text=True, cwd=cwd)
    assert "Traceback" not in out.stderr, out.stderr
    return out.returncode, out.stdout, out.stderr


@pytest.fixture
def feats_path(image_folder, tiny_backbone, tmp_path):
    out = tmp_path / "f.h5"
    embed(image_folder, out, backbone=tiny_backbone, layers=["blocks.5", "avgpool"],
          num_workers=0, progress=False)
    return out


# -- wrong answers ---------------------------------------------------------------------------

def test_predict_names_classes_by_the_estimators_columns(feats_path, tmp_path):
    """A head whose estimator never saw class 0 ('blue') must still name red images 'red'."""
    ff = open_features(feats_path)
    X, y = ff.X("avgpool", "train"), ff.y("train")
    keep = y != 0
    pipe = refit(X[keep], y[keep], "logreg", {"C": 1.0})
    head = Head(pipe, "logreg", "linear", "avgpool", ff.classes, ff.layer_provenance("avgpool"),
                {"C": 1.0}, 1.0, [])
    assert head.column_classes == ["green", "red"]
    head.save(tmp_path / "h.joblib")
    reds = [p for p, c in zip(ff.paths("test"), ff.y("test")) if ff.classes[c] == "red"]
    rows = predict(tmp_path / "h.joblib", reds)
    assert [r["predicted"] for r in rows] == ["red"] * len(reds)
    assert all(dict(r["top_k"]).keys() <= {"green", "red"} for r in rows)


@pytest.mark.slow
def test_a_class_without_training_rows_is_refused_and_announced(tmp_path, tiny_backbone):
    root = tmp_path / "data"
    for split, classes in (("train", ["a", "b"]), ("test", ["a", "b", "c"])):
        for ci, c in enumerate(classes):
            (root / split / c).mkdir(parents=True)
            for i in range(3):
                make_image(root / split / c / f"{i}.png", (60 * ci, 100, 200 - 60 * ci), ci * 10 + i)
    with pytest.warns(DataWarning, match=r"\['c'\] not in train/"):
        embed(root, tmp_path / "f.h5", backbone=tiny_backbone, layers=["avgpool"],
              num_workers=0, progress=False)
    with pytest.raises(HeadError, match=r"classes \['c'\] .* have no training rows"):
        fit_head(tmp_path / "f.h5", "avgpool", "logreg")
    code, _, err = cli("compare", tmp_path / "f.h5", "-o", tmp_path / "r")
    assert code == 1 and "have no training rows" in err


def test_joined_file_refuses_missing_shards_and_copy_is_self_contained(
        image_folder, tiny_backbone, tmp_path):
    parts = []
    for i in range(2):
        parts.append(tmp_path / f"part{i}.h5")
        embed(image_folder, parts[-1], backbone=tiny_backbone, layers=["avgpool"], shard=(i, 2),
              num_workers=0, progress=False)
    join_shards(parts, tmp_path / "joined.h5")
    join_shards(parts, tmp_path / "copied.h5", copy=True)
    expected = open_features(tmp_path / "joined.h5").X("avgpool")
    with h5py.File(tmp_path / "joined.h5") as f:
        assert np.isnan(f["layers/avgpool"].fillvalue)
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.move(tmp_path / "joined.h5", moved / "joined.h5")
    with pytest.raises(StoreError, match=r"shard files are missing: .*part0\.h5, .*part1\.h5.*--copy"):
        open_features(moved / "joined.h5")
    shutil.move(moved / "joined.h5", tmp_path / "joined.h5")
    parts[1].unlink()
    code, _, err = cli("info", tmp_path / "joined.h5")
    assert code == 1 and "part1.h5" in err and "part0.h5" not in err
    parts[0].unlink()
    np.testing.assert_array_equal(open_features(tmp_path / "copied.h5").X("avgpool"), expected)


@pytest.mark.slow
def test_score_checks_provenance_and_matches_a_hand_computation(feats_path, image_folder,
                                                                tiny_backbone, tmp_path):
    head = fit_head(feats_path, "avgpool", "logreg")
    head.save(tmp_path / "h.skops")
    code, out, _ = cli("score", tmp_path / "h.skops", feats_path, "--json")
    assert code == 0
    res = json.loads(out)
    ff = open_features(feats_path)
    pred, y = head.predict(ff.X("avgpool", "test")), ff.y("test")
    assert res["n"] == len(y) and res["accuracy"] == pytest.approx((pred == y).mean())
    other = tmp_path / "max.h5"
    embed(image_folder, other, backbone=tiny_backbone, layers=["avgpool"], pool="max",
          num_workers=0, progress=False)
    code, _, err = cli("score", tmp_path / "h.skops", other)
    assert code == 1 and "specs" in err and "'pool': 'max'" in err


def test_preprocessing_follows_the_weights_asked_for(tmp_path, monkeypatch):
    """regnet_y_400mf: IMAGENET1K_V1 resizes to 256, the DEFAULT (V2) to 232."""
    import torchvision

    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    model = torchvision.models.regnet_y_400mf()
    for w in torchvision.models.RegNet_Y_400MF_Weights:
        torch.save(model.state_dict(), hub / "checkpoints" / w.url.rsplit("/", 1)[1])
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(hub))
    try:
        assert load_backbone("regnet_y_400mf", "IMAGENET1K_V1").preprocess.resize == 256
        assert load_backbone("regnet_y_400mf", "IMAGENET1K_V2").preprocess.resize == 232
        assert load_backbone("regnet_y_400mf", "DEFAULT").preprocess.resize == 232
    finally:
        torch.hub.set_dir(old)


def test_unfinished_files_are_refused(feats_path, tmp_path):
    unfinished = tmp_path / "u.h5"
    shutil.copyfile(feats_path, partial_path(unfinished))
    with h5py.File(partial_path(unfinished), "r+") as f:
        f.attrs["complete"] = False
        f.attrs["n_done"] = 9
    with pytest.raises(StoreError, match=r"unfinished: 9 of 18 inputs.*resume"):
        fit_head(unfinished, "avgpool", "logreg")
    code, _, err = cli("compare", unfinished, "-o", tmp_path / "r")
    assert code == 1 and "unfinished" in err and not (tmp_path / "r").exists()
    code, out, _ = cli("info", unfinished)  # info still shows it
    assert code == 0 and "INCOMPLETE" in out


# -- lost outputs ----------------------------------------------------------------------------

@pytest.mark.slow
def test_compare_overwrite_replaces_only_its_own_files(feats_path, tmp_path):
    work = feats_path.parent
    (work / "notes.txt").write_text("mine")
    code, _, err = cli("compare", feats_path, "-o", work, "--heads", "logreg,svm", "-q")
    assert code == 1 and "--overwrite" in err
    kw = dict(progress=False, n_boot=50, n_jobs=1)
    compare(feats_path, work, heads=["logreg", "svm"], overwrite=True, **kw)
    assert (work / "heads" / "avgpool-svm.joblib").is_file()
    compare(feats_path, work, heads=["knn"], layers=["avgpool"], overwrite=True, **kw)
    assert (work / "notes.txt").read_text() == "mine" and feats_path.is_file()
    assert sorted(p.name for p in (work / "heads").iterdir()) == ["avgpool-knn.joblib"]
    assert load_head(work / "best.joblib").kind == "knn"
    assert not [p for p in work.iterdir() if p.name.startswith(".compare-")]


def test_join_refuses_to_write_over_its_input(image_folder, tiny_backbone, tmp_path):
    parts = []
    for i in range(2):
        parts.append(tmp_path / f"part{i}.h5")
        embed(image_folder, parts[-1], backbone=tiny_backbone, layers=["avgpool"], shard=(i, 2),
              num_workers=0, progress=False)
    before = parts[0].read_bytes()
    code, _, err = cli("join", parts[0], parts[0], parts[1], "--overwrite")
    assert code == 1 and "also an input" in err
    assert parts[0].read_bytes() == before


@pytest.mark.slow
def test_embed_overwrite_keeps_the_old_file_until_the_new_one_is_complete(
        feats_path, image_folder, tiny_backbone, monkeypatch):
    from featurecache.extract import FeatureExtractor

    before = feats_path.read_bytes()

    def crash(self, x):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(FeatureExtractor, "forward", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        embed(image_folder, feats_path, backbone=tiny_backbone, layers=["blocks.5", "avgpool"],
              overwrite=True, num_workers=0, progress=False)
    assert feats_path.read_bytes() == before


# -- heads that are safe to share ------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("kind", ["logreg", "svm", "knn"])
def test_skops_heads_round_trip(feats_path, tmp_path, kind):
    head = fit_head(feats_path, "avgpool", kind)
    head.save(tmp_path / "h.skops")
    again = load_head(tmp_path / "h.skops")
    X = open_features(feats_path).X("avgpool")
    np.testing.assert_array_equal(again.predict(X), head.predict(X))
    assert again.classes == head.classes and again.provenance == head.provenance


@pytest.mark.slow
def test_skops_refuses_unknown_types(feats_path, tmp_path):
    import skops.io as sio

    head = fit_head(feats_path, "avgpool", "logreg")
    head.save(tmp_path / "h.skops")
    bad = {"format": "featurecache-head", "format_version": 1, "payload": os.system}
    sio.dump(bad, tmp_path / "evil.skops")
    with pytest.raises(HeadError, match=r"types .* could run code .*system"):
        load_head(tmp_path / "evil.skops")
    code, _, err = cli("predict", tmp_path / "evil.skops", feats_path)
    assert code == 1 and "Refusing to load" in err


# -- a kill at any write leaves the previous output or none ----------------------------------

# the swept commands run in one process: a search's joblib pool (n_jobs=-1) would start
# worker processes that outlive a killed parent for loky's idle timeout (300 s), and strace -f
# waits for every process it traces
ONE_PROCESS = {**os.environ, "LOKY_MAX_CPU_COUNT": "1"}


def _writes(cmd, cwd) -> tuple:
    """``(syscall, output writes, all writes)``: the call (write or pwrite64) that first
    writes a file under ``cwd``, the 1-based numbers of those calls of that thread that write
    there, and that thread's total of that call. (strace counts an injection's ``when`` per
    syscall and traced thread; the interpreter's helpers, such as ctypes' ldconfig, are other
    processes.)"""
    log = cwd / "writes.strace"
    subprocess.run(["strace", "-f", "--seccomp-bpf", "-y", "-e", "trace=write,pwrite64", "-o",
                    str(log), sys.executable, "-m", "featurecache.cli", *cmd],
                   capture_output=True, cwd=cwd, env=ONE_PROCESS)
    lines = log.read_text().splitlines()
    log.unlink()
    writes = [line for line in lines if "write" in line.split()[1]]
    first = next(line for line in writes if f"<{cwd}/" in line.split(",")[0])
    writer, call = first.split()[0], first.split()[1].split("(")[0]
    own = [line for line in writes if line.split()[0] == writer and
           line.split()[1].startswith(call + "(")]
    inside = [k for k, line in enumerate(own, 1) if f"<{cwd}/" in line.split(",")[0]]
    return call, inside, len(own)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
# (the fine-tune writes into a version folder nothing points to until its publication, which
# the rename sweep below and tests/test_publish.py kill at each call)
@pytest.mark.parametrize("command", ["fit-head", "join", "compare", "predict"])
def test_a_kill_at_any_write_leaves_the_old_output_or_none(command, image_folder, tiny_backbone,
                                                          tmp_path, feats_path):
    if command == "join":
        for i in range(2):
            embed(image_folder, tmp_path / f"p{i}.h5", backbone=tiny_backbone,
                  layers=["avgpool"], shard=(i, 2), num_workers=0, progress=False)
    fit_head(feats_path, "avgpool", "logreg").save(tmp_path / "given.joblib")
    cmd, final = {  # one process (--n-jobs 1): a kill lands in the command, not in a worker
        "fit-head": (["fit-head", "logreg", "f.h5", "--layer", "avgpool", "-o", "h.joblib",
                      "--n-jobs", "1"], "h.joblib"),
        "join": (["join", "j.h5", "p0.h5", "p1.h5", "--overwrite"], "j.h5"),
        "compare": (["compare", "f.h5", "-o", "rep", "--heads", "logreg", "--layers", "avgpool",
                     "--overwrite", "-q", "--n-jobs", "1"], "rep/best.joblib"),
        "predict": (["predict", "given.joblib", str(image_folder), "-o", "p.csv"], "p.csv"),
    }[command]
    assert subprocess.run([sys.executable, "-m", "featurecache.cli", *cmd], cwd=tmp_path,
                          env=ONE_PROCESS).returncode == 0
    previous = (tmp_path / final).read_bytes()
    call, inside, n = _writes(cmd, tmp_path)
    assert inside, (call, n)  # the sweep reaches the output
    # the first, a middle and the last write of a file, and the next write (a message, after
    # the output is in place); traced in full: strace 6.1 does not deliver an injected signal
    # under --seccomp-bpf
    for when in sorted({inside[0], inside[len(inside) // 2], inside[-1], min(inside[-1] + 1, n)}):
        res = subprocess.run(["strace", "-f", "-o", "/dev/null", "-e", f"trace={call}",
                              "-e", f"inject={call}:signal=KILL:when={when}",
                              sys.executable, "-m", "featurecache.cli", *cmd], cwd=tmp_path,
                             capture_output=True, env=ONE_PROCESS)
        assert res.returncode in (-9, 137), (command, when, res.returncode)  # the kill happened
        data = (tmp_path / final).read_bytes()
        assert data == previous or _complete(tmp_path / final), (command, when)


def _calls(cmd, cwd, syscalls) -> dict:
    """How often an uninterrupted run makes each of ``syscalls``."""
    out = subprocess.run(["strace", "-f", "--seccomp-bpf", "-c", "-e",
                          "trace=" + ",".join(syscalls), "-o", "/dev/stdout", sys.executable,
                          "-m", "featurecache.cli", *cmd],
                         capture_output=True, text=True, cwd=cwd, env=ONE_PROCESS)
    found = {line.split()[-1]: int(line.split()[3]) for line in out.stdout.splitlines()
             if line.split() and line.split()[-1] in syscalls and line.split()[3].isdigit()}
    return {s: found.get(s, 0) for s in syscalls}


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
@pytest.mark.parametrize("command", ["fit-head", "compare", "finetune"])
def test_a_kill_at_any_rename_or_unlink_leaves_the_old_output_or_the_new_one_whole(
        command, image_folder, tiny_backbone, tmp_path, feats_path):
    """Issue 22, item 4: finetune/compare --overwrite killed between two renames mixed the
    files of two runs (a new model.pt beside the old summary.json)."""
    from featurecache.files import published

    if command == "finetune":
        embed(image_folder, tmp_path / "m.h5", backbone=tiny_backbone, layers=["avgpool"],
              keep_map=["stage4"], num_workers=0, progress=False)
    cmd, final = {
        "fit-head": (["fit-head", "logreg", "f.h5", "--layer", "avgpool", "-o", "h.joblib",
                      "--n-jobs", "1"], "h.joblib"),
        "compare": (["compare", "f.h5", "-o", "rep", "--heads", "logreg", "--layers", "avgpool",
                     "--overwrite", "-q", "--n-jobs", "1"], "rep"),
        "finetune": (["finetune", "m.h5", "-o", "ft", "--epochs", "1", "--overwrite", "-q"],
                     "ft"),
    }[command]
    assert subprocess.run([sys.executable, "-m", "featurecache.cli", *cmd],
                          cwd=tmp_path, env=ONE_PROCESS).returncode == 0
    final = tmp_path / final
    previous = published(final).name if final.is_dir() else final.read_bytes()
    # the fine-tune (the slowest command under strace's ptrace) is swept at its publication's
    # own calls; the clean-up unlinks it shares with fit-head and compare are swept there
    calls = _calls(cmd, tmp_path, ("rename", "symlink") if command == "finetune" else
                   ("rename", "unlink", "unlinkat", "symlink"))
    assert calls["rename"] >= 1
    for syscall, n in calls.items():
        # the output is published last: the last calls of each kind (tests/test_publish.py
        # kills the publication at every one of its calls)
        for when in range(max(1, n - (1 if syscall == "rename" else 0)), n + 1):
            res = subprocess.run(["strace", "-f", "-o", "/dev/null", "-e", f"trace={syscall}",
                                  "-e", f"inject={syscall}:signal=KILL:when={when}",
                                  sys.executable, "-m", "featurecache.cli", *cmd], cwd=tmp_path,
                                 capture_output=True, env=ONE_PROCESS)
            assert res.returncode in (-9, 137), (syscall, when, res.returncode)
            if not final.is_dir():
                assert final.read_bytes() == previous or _complete(final), (syscall, when)
                continue
            version = published(final)
            files = sorted(p.name for p in final.iterdir() if not p.name.startswith("."))
            # every published name leads into the one version, which has all of them
            assert files == sorted(p.name for p in version.iterdir()), (syscall, when)
            assert all((final / f).resolve().parent in (version, version / "heads")
                       for f in files), (syscall, when)
            if version.name != previous:  # the new one: whole, one run's files
                if command == "finetune":
                    assert _complete(final / "model.pt"), (syscall, when)
                else:
                    res = json.loads((final / "results.json").read_text())
                    assert res["settings"]["run_id"] == version.name
                    assert load_head(final / "best.joblib").kind == "logreg"
                previous = version.name


def _complete(path) -> bool:
    """A whole output of the same kind: loads and has content."""
    if path.suffix == ".joblib":
        load_head(path)
        return True
    if path.suffix == ".pt":  # the fine-tune folder's files are renamed in together
        from featurecache.checkpoint import load_finetuned

        ft = load_finetuned(path.parent)
        summary = json.loads((path.parent / "summary.json").read_text())
        return ft.history == summary["history"] and ft.run_id == summary["run_id"]
    if path.suffix == ".h5":
        return open_features(path).n_rows == 18
    lines = path.read_text().splitlines()
    return len(lines) == 19 and lines[0].startswith("path,")


def test_outputs_get_the_umask_mode_not_the_temporary_files_0600(tmp_path):
    """A file written through atomic_output is readable as any file the user writes
    (mkstemp's 0600 once made every head, prediction and feature file private)."""
    from featurecache.files import atomic_output

    old = os.umask(0o022)
    try:
        with atomic_output(tmp_path / "a.txt") as tmp:
            tmp.write_text("x")
        os.umask(0o077)
        with atomic_output(tmp_path / "b.txt") as tmp:
            tmp.write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o600
