"""Multi-file outputs (a fine-tune's folder, a report) are published as one unit (issue 22,
item 4): killed at any rename, link or unlink of the publication, the folder shows the old
output whole or the new one whole, never a mix; what a killed run leaves is cleaned by the
next one (item 5)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from featurecache.errors import FeaturecacheError
from featurecache.files import output_folder, publish_folder, published

STRACE = shutil.which("strace")
needs_strace = pytest.mark.skipif(STRACE is None, reason="needs strace")

# one publication in a fresh process: every file holds the run's tag
SCRIPT = """
import sys
from pathlib import Path
from featurecache.files import publish_folder
out, tag, names = Path(sys.argv[1]), sys.argv[2], sys.argv[3].split(",")
def write(folder):
    for n in names:
        (folder / n).parent.mkdir(parents=True, exist_ok=True)
        (folder / n).write_text(tag)
publish_folder(out, write, legacy=sys.argv[4].split(",") if sys.argv[4] else ())
"""
OLD = ["model.pt", "summary.json", "curve.png", "heads/a.joblib", "heads/b.joblib"]
NEW = ["model.pt", "summary.json", "extra.csv", "heads/a.joblib"]


def view(out: Path) -> dict:
    """What a user sees in ``out``: every file under its published names (links followed),
    with its content; featurecache's bookkeeping left out."""
    seen = {}
    for p in sorted(out.rglob("*")) if out.is_dir() else []:
        rel = p.relative_to(out)
        if rel.parts[0].startswith("."):
            continue
        if p.is_file():
            seen[str(rel)] = p.read_text()
    # files reached through a linked folder (heads -> .current/heads)
    for top in out.iterdir() if out.is_dir() else []:
        if top.is_symlink() and top.is_dir() and not top.name.startswith("."):
            for p in top.rglob("*"):
                if p.is_file():
                    seen[str(p.relative_to(out))] = p.read_text()
    return seen


def run(script, out, tag, names, legacy=(), strace=()):
    return subprocess.run([*strace, sys.executable, str(script), str(out), tag, ",".join(names),
                           ",".join(legacy)], capture_output=True, text=True)


def count(script, out, syscall, prepare) -> int:
    prepare()
    log = out.parent / "trace.log"
    run(script, out, "new", NEW, OLD, [STRACE, "-f", "-qq", "-e", f"trace={syscall}", "-o",
                                        str(log)])
    return sum(f"{syscall}(" in line for line in log.read_text().splitlines())


def versioned_old(script, out):
    def prepare():
        shutil.rmtree(out, ignore_errors=True)
        assert run(script, out, "old", OLD).returncode == 0
    return prepare


def legacy_old(out):
    """A folder written by a release before versions: plain files."""
    def prepare():
        shutil.rmtree(out, ignore_errors=True)
        for n in OLD:
            (out / n).parent.mkdir(parents=True, exist_ok=True)
            (out / n).write_text("old")
        (out / "notes.txt").write_text("mine")  # the user's own file
    return prepare


def test_publish_replaces_the_old_output_and_keeps_the_users_files(tmp_path):
    out = tmp_path / "ft"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for names, tag in ((OLD, "old"), (NEW, "new")):
        publish_folder(out, lambda f, names=names, tag=tag: [
            ((f / n).parent.mkdir(parents=True, exist_ok=True), (f / n).write_text(tag))
            for n in names])
    assert view(out) == {**{n: "new" for n in NEW}, "notes.txt": "mine"}
    # one version left, and the reader's single resolution holds every file
    assert [p.name for p in (out / ".versions").iterdir() if p.is_dir()] == [published(out).name]
    assert sorted(str(p.relative_to(published(out))) for p in published(out).rglob("*")
                  if p.is_file()) == sorted(NEW)


def test_a_failing_write_leaves_the_old_output_and_no_version(tmp_path):
    out = tmp_path / "ft"
    publish_folder(out, lambda f: (f / "model.pt").write_text("old"))

    def broken(folder):
        (folder / "model.pt").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        publish_folder(out, broken)
    assert view(out) == {"model.pt": "old"}
    assert len([p for p in (out / ".versions").iterdir() if p.is_dir()]) == 1


def test_what_a_killed_run_left_does_not_block_the_next_one(tmp_path):
    """Item 5: a killed first run leaves an unpublished version (and an old release's staging
    folder): the folder counts as empty, and the next publication removes them."""
    out = tmp_path / "ft"
    (out / ".versions" / "20260101T000000-deadbeef").mkdir(parents=True)
    (out / ".versions" / "20260101T000000-deadbeef" / "model.pt").write_text("half")
    (out / ".finetune-abc123").mkdir()
    (out / ".finetune-abc123" / "model.pt").write_text("half")
    assert output_folder(out, overwrite=False, what="fine-tune") == out
    publish_folder(out, lambda f: (f / "model.pt").write_text("new"))
    assert sorted(p.name for p in out.iterdir()) == [".current", ".versions", "model.pt"]
    assert [p.name for p in (out / ".versions").iterdir() if p.is_dir()] == [published(out).name]
    # a published output is not empty: --overwrite is asked for
    with pytest.raises(FeaturecacheError, match="not empty.*overwrite"):
        output_folder(out, overwrite=False, what="fine-tune")


def test_a_folder_of_the_users_under_a_published_name_is_refused(tmp_path):
    out = tmp_path / "r"
    (out / "heads").mkdir(parents=True)
    (out / "heads" / "mine.txt").write_text("mine")
    with pytest.raises(FeaturecacheError, match="heads is a folder"):
        publish_folder(out, lambda f: ((f / "heads").mkdir(), (f / "heads" / "a").write_text("x")))
    assert (out / "heads" / "mine.txt").read_text() == "mine"


@pytest.mark.slow
@needs_strace
@pytest.mark.parametrize("start", ["versioned", "legacy", "empty"])
@pytest.mark.parametrize("syscall", ["rename", "symlink", *(
    pytest.param(s, marks=pytest.mark.sweep) for s in ("unlink", "unlinkat", "link", "rmdir"))])
def test_a_kill_at_any_call_of_the_publication_leaves_old_or_new_whole(tmp_path, start,
                                                                       syscall):
    script = tmp_path / "pub.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out"
    prepare = {"versioned": versioned_old(script, out), "legacy": legacy_old(out),
               "empty": lambda: shutil.rmtree(out, ignore_errors=True)}[start]
    prepare()
    old = view(out)
    new = {**{n: "new" for n in NEW}, **({"notes.txt": "mine"} if start == "legacy" else {})}
    n = count(script, out, syscall, prepare)
    if syscall == "rename":
        assert n > 0  # the sweep reaches the publication
    for when in range(1, n + 1):
        prepare()
        r = run(script, out, "new", NEW, OLD,
                [STRACE, "-f", "-qq", "-o", os.devnull, "-e", f"trace={syscall}",
                 "-e", f"inject={syscall}:signal=KILL:when={when}"])
        seen = view(out)
        assert seen in (old, new), (syscall, when, r.returncode, seen)
        # the next run publishes the new output and cleans what the killed one left
        assert run(script, out, "new", NEW, OLD).returncode == 0
        assert view(out) == new, (syscall, when)
        left = sorted(p.name for p in out.iterdir() if p.name.startswith("."))
        assert left == [".current", ".versions"], (syscall, when, left)
        assert sorted(p.name for p in (out / ".versions").iterdir()) == \
            [".publish.lock", published(out).name]
