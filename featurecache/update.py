"""``embed --update``: bring a complete feature file up to date with its data as they are now.

The data are listed again and compared with the file's rows by record id (the stored path)
and content stamp (``/stamps``: ``size:mtime_ns`` of a file, ``size:ETag`` of an object):

* **unchanged** (same id, same stamp): the row is copied, never recomputed: the same bytes;
* **relabelled** (same id and stamp, another class): copied too, with the label the data now
  give (the image, hence its features, did not change);
* **changed** (same id, another stamp: rewritten) and **new** (an id the file does not hold)
  images are embedded; images the file skipped before are tried again (**retried**);
* **deleted** (rows whose id the data no longer list) are dropped.

The new file holds the rows in the order a fresh embed of the current data has (the source's
order), with the labels the data now give. **A row's split never moves**: a row the old file
holds keeps its split; a new image takes the split the data give it (split folders, a
manifest's split column, a tar shard's name) or, when the data give none, one drawn from a
seeded hash of its id alone (:func:`hashed_split`: test with probability ``test_size``
whatever the other images are, so stratified in expectation), never a re-draw of the whole
split. ``info`` shows this in the split origin.

Settings that define the features (backbone, weights, preprocessing, pooling, dtype, layers,
maps) must be the file's own, as for a resume: a difference is refused, naming the field.

Crash safety is the embed's: the new file is built in ``NAME.partial/`` (segments committed
in order; the copied rows go through the same writer) while the old ``NAME`` stays readable,
and replaces it by one rename. A kill at any write leaves the old file, and the same command
resumes the update (or starts it over when the data or the old file changed meanwhile).

A file made before rows kept stamps (no ``/stamps``): its rows count as unchanged only when
its data fingerprint proves that none of them changed (the fingerprint is recomputed from the
rows with the stamps the data have now: possible when no image was deleted and, for a seeded
split, none was skipped); otherwise every kept row is embedded again (counted as changed),
and the new file records stamps, so the next update compares row by row.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import OptionError, StoreMismatchError, option

__all__ = ["hashed_split", "Plan", "plan_update", "update_file", "summary"]

COUNTS = ("new", "changed", "deleted", "unchanged", "relabelled", "retried")


def hashed_split(record_id: str, test_size: float, seed: int) -> str:
    """``test`` with probability ``test_size``, from a seeded hash of the record id alone:
    the split an update gives a new image when the data give none (independent of the other
    images, so an image's split is the same whatever is added or removed beside it)."""
    digest = hashlib.sha256(f"featurecache-split {seed} {record_id}".encode(
        "utf-8", "surrogateescape")).digest()
    return "test" if int.from_bytes(digest[:8], "big") < test_size * 2.0 ** 64 else "train"


@dataclass
class Plan:
    """What an update does: the new file's records in order, and for each the old row it
    is copied from (-1: embedded)."""

    records: list
    copy_from: list
    classes: list
    counts: dict
    split_origin: str
    notes: list = field(default_factory=list)

    @property
    def n_embed(self) -> int:
        return sum(1 for j in self.copy_from if j < 0)

    @property
    def up_to_date(self) -> bool:
        """Nothing to write: the same rows, labels and order (retrying skipped inputs alone
        does not make a new file)."""
        c = self.counts
        return not (c["new"] or c["changed"] or c["deleted"] or c["relabelled"])


def plan_update(old, src, max_per_class=None, test_size=0.3, seed=0) -> Plan:
    """Compare the complete feature file ``old`` (a :class:`~featurecache.store.FeatureFile`)
    with ``src``, the data listed now without ``max_per_class`` (applied here, after the
    splits are settled)."""
    from .data.base import _limit

    paths = old.paths()
    at = {p: j for j, p in enumerate(paths)}
    names = [old.classes[i] for i in old.y()]
    splits = old.splits()
    stamps = old.stamps()
    skipped_before = {p for p, _ in old.skipped()}
    given = src.split_origin == "given"
    records, moved = [], 0
    for r in src.records:
        j = at.get(r.path)
        if j is not None:
            moved += given and r.split != splits[j]
            split = splits[j]
        else:
            split = r.split if given else hashed_split(r.path, test_size, seed)
        records.append(dataclasses.replace(r, split=split))
    if not type(src).keeps_order:
        records.sort(key=lambda r: (r.split, r.label, r.path))
    if max_per_class is not None:
        records = _limit(records, max_per_class)
    counts = dict.fromkeys(COUNTS, 0)
    copy_from, unknown, notes = [], [], []
    for k, r in enumerate(records):
        j = at.get(r.path)
        if j is None:
            counts["retried" if r.path in skipped_before else "new"] += 1
            copy_from.append(-1)
            continue
        was = stamps[j] if stamps is not None else None
        if r.label < 0:  # its label is gone (a tar sample): embedded, hence skipped, as afresh
            counts["changed"] += 1
            copy_from.append(-1)
            continue
        if was is None or (was == "" and r.stamp != ""):
            unknown.append(k)  # decided below, by the data fingerprint
        elif was != r.stamp:
            counts["changed"] += 1
            copy_from.append(-1)
            continue
        copy_from.append(j)
    if unknown:
        if _fingerprint_allows(old, src):
            notes.append(f"{len(unknown):,} rows without a stored stamp: unchanged, as the "
                         f"file's data fingerprint shows")
        else:
            notes.append(f"{old.path} records no per-row stamps (made before they were "
                         f"kept) and its data fingerprint cannot show that its images are "
                         f"unchanged (images were deleted, rewritten or skipped since): its "
                         f"{len(unknown):,} kept rows are embedded again; the new file records "
                         f"stamps")
            for k in unknown:
                copy_from[k] = -1
            counts["changed"] += len(unknown)
    for k, r in enumerate(records):
        j = copy_from[k]
        if j >= 0:
            counts["relabelled" if names[j] != src.classes[r.label] else "unchanged"] += 1
    counts["deleted"] = len(paths) - sum(1 for r in records if r.path in at)
    if moved:
        notes.append(f"{moved:,} rows keep the split they had although the data now give "
                     f"another (a row's split never moves on update; embed anew with "
                     f"{option('overwrite')} to take the new splits)")
    origin = old.provenance.get("split_origin") or src.split_origin
    if not given and "hashed(" not in origin and (counts["new"] or counts["retried"]):
        origin += f"; rows added by --update: hashed(test_size={test_size}, seed={seed})"
    plan = Plan(records, copy_from, list(src.classes), counts, origin, notes)
    if plan.up_to_date and counts["retried"]:  # (no new file for them alone)
        notes.append(f"{counts['retried']:,} inputs skipped before are not tried again: "
                     f"nothing else changed")
        counts["retried"] = 0
    return plan


def _fingerprint_allows(old, src) -> bool:
    """Whether the old file's data fingerprint equals the one its rows (and skipped inputs)
    would have with the stamps the data have now: then no row's image changed."""
    now = {r.path: r for r in src.records}
    classes = list(old.classes)
    index = {c: i for i, c in enumerate(classes)}
    entries = [(p, int(y), s) for p, y, s in zip(old.paths(), old.y(), old.splits())]
    given = old.provenance.get("split_origin") == "given"
    for p, _ in old.skipped():  # listed then, with the label and split they had then
        r = now.get(p)
        if r is None or r.label < 0 or not given or src.classes[r.label] not in index:
            return False
        entries.append((p, index[src.classes[r.label]], r.split))
    if any(p not in now for p, _, _ in entries):
        return False  # a deleted image's stamp then is not known
    if type(src).keeps_order:
        order = {r.path: n for n, r in enumerate(src.records)}
        entries.sort(key=lambda e: order[e[0]])
    else:
        entries.sort(key=lambda e: (e[2], e[1], e[0]))
    h = hashlib.sha256(json.dumps(classes).encode())
    for p, y, s in entries:
        h.update(f"{p}\t{y}\t{s}\t{now[p].stamp}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest() == old.provenance.get("data_fingerprint")


def summary(counts: dict) -> str:
    """``+N new, ~M changed, -K deleted, U unchanged`` (and relabelled, retried when any)."""
    c = counts
    text = (f"+{c['new']:,} new, ~{c['changed']:,} changed, -{c['deleted']:,} deleted, "
            f"{c['unchanged']:,} unchanged")
    if c.get("relabelled"):
        text += f", {c['relabelled']:,} relabelled (copied)"
    if c.get("retried"):
        text += f", {c['retried']:,} skipped before and retried"
    return text


def update_file(source, output, *, shard=(0, 1), say, progress, t0, retried, overwrite=False,
                max_per_class=None, test_size=0.3, seed=0, **kw):
    """``embed(..., update=True)`` (see the module's docstring); returns its
    :class:`~featurecache.embedding.EmbedResult`, whose ``update`` holds the counts."""
    from .data import remote
    from .embedding import EmbedResult, prepare
    from .extract import FeatureExtractor, on_device
    from .store import Writer, open_features

    if overwrite:
        raise OptionError(f"{option('update')} and {option('overwrite')} do not go together: "
                          f"an update keeps the unchanged rows, an overwrite embeds everything "
                          f"anew; choose one.")
    if tuple(shard) != (0, 1):
        raise OptionError(f"{option('update')} updates a whole file, not one shard: drop "
                          f"{option('shard', f'{shard[0]}/{shard[1]}')}.")
    output = Path(output)
    kw.update(test_size=test_size, seed=seed, max_per_class=max_per_class)
    job = prepare(source, output, say=say, **kw)
    old = open_features(output) if output.exists() and not output.is_dir() else None
    if old is None:
        say(f"{output} does not exist yet: embedding every image")
        plan = Plan(list(job.records), [-1] * len(job.records), list(job.source.classes),
                    {**dict.fromkeys(COUNTS, 0), "new": len(job.records)},
                    job.source.split_origin)
        meta = dict(job.meta)
    else:
        old.check_complete()
        _check_settings(old, job.meta, output)
        src = job.source
        if max_per_class is not None:  # the whole listing: the limit comes after the splits
            spec = src.spec or src.root
            src = type(src).open(spec, test_size=test_size, seed=seed, max_per_class=None,
                                 storage_options=src.storage_options,
                                 label_field=src.label_field)
        plan = plan_update(old, src, max_per_class, test_size, seed)
        whole = dataclasses.replace(src, records=plan.records, split_origin=plan.split_origin,
                                    whole_fingerprint="", part=None)
        meta = {**job.meta, "data_fingerprint": whole.fingerprint(), "n_inputs": len(plan.records),
                "split_origin": plan.split_origin,
                "update_of": old.provenance.get("creation_id") or old.provenance.get("fingerprint"),
                "update_of_created": old.provenance.get("created") or ""}
        say(f"update of {output}: {summary(plan.counts)}")
        for note in plan.notes:
            say(note)
        if plan.up_to_date:
            from .store.writer import remove_finished_partial

            if remove_finished_partial(output):  # a kill cut the last update's clean-up short
                say(f"removed {output}.partial, left by the run that made {output}")
            return EmbedResult(output, old.n_rows, int(old.provenance["n_skipped"]), 0,
                               time.perf_counter() - t0, True,
                               [s for s in job.specs if s.group == "layers"], job.source.ignored,
                               [s for s in job.specs if s.is_map], remote.retries() - retried,
                               {**plan.counts, "embedded": 0, "copied": 0, "notes": plan.notes})
        meta["update"] = {**plan.counts, "embedded": plan.n_embed,
                          "copied": len(plan.records) - plan.n_embed}
    if not plan.records:
        from .errors import DataError

        raise DataError(f"{source}: no images left to keep; nothing to write.")
    bb, dev = job.backbone, job.device
    extractor = FeatureExtractor(bb.model, job.specs)
    meta["extraction_method"] = extractor.method
    with on_device(bb.model, dev), Writer(output, meta, job.specs, plan.classes, update=True,
                                         commit_rows=kw["commit_rows"],
                                         commit_every=kw["commit_every"]) as w:
        if w.restarted:
            say(f"discarded the rows of an earlier, different run in {w.partial}")
        resumed = w.n_done
        if resumed:
            say(f"resuming the update after {resumed:,} of {len(plan.records):,} rows "
                f"committed earlier")
        _run_update(job.source, plan, resumed, old, bb, extractor, dev, w, job.batch_size,
                    kw["num_workers"], kw["on_error"], progress, kw["commit_rows"])
        w.close(complete=True)
    counts = {**plan.counts, "embedded": plan.n_embed, "copied": len(plan.records) - plan.n_embed,
              "notes": plan.notes}
    return EmbedResult(output, w.n_committed, w.n_skipped, resumed, time.perf_counter() - t0,
                       False, [s for s in job.specs if s.group == "layers"], job.source.ignored,
                       [s for s in job.specs if s.is_map], remote.retries() - retried, counts)


def _check_settings(old, meta: dict, output: Path) -> None:
    """Refuse an update with settings other than the file's (as a resume does), naming the
    fields; for a seeded split, its seed and test share too (new images are split with them)."""
    from .store.writer import settings_differ

    p = old.provenance
    diff = settings_differ(p, meta, ignore=("data_fingerprint",))
    if str(p.get("split_origin", "")).startswith("seeded"):
        diff += [k for k in ("seed", "test_size") if p.get(k) != meta.get(k)]
    if diff:
        detail = "; ".join(f"{k}: file has {p.get(k)!r}, this run has {meta.get(k)!r}"
                           for k in diff[:3])
        raise StoreMismatchError(
            f"{output} was made with different settings ({detail}). An update keeps the "
            f"file's settings: use the same ones, another output path, or "
            f"{option('overwrite')} (without {option('update')}) to embed everything anew.")


def _run_update(source, plan: Plan, start: int, old, bb, extractor, dev, writer, batch_size,
                num_workers, on_error, progress, commit_rows) -> None:
    """Write the plan's rows from ``start`` on, in order: copied rows read from ``old``,
    embedded ones from the forward passes. Batches of embedded images are cut within windows
    of a fixed number of rows (a multiple of ``batch_size``), so a commit never falls inside
    one: a resumed update cuts the same batches, and one window of rows is in memory at most.
    The progress bar and ``progress(done, total)`` count the embedded images only."""
    from tqdm.auto import tqdm

    from .embedding import _embedded

    records, copy_from = plan.records, plan.copy_from
    dtype = np.dtype(writer.meta["dtype"])
    row_bytes = sum(int(np.prod(s.row_shape)) for s in writer.specs) * dtype.itemsize
    window = batch_size * max(1, min(4096, (64 << 20) // max(1, row_bytes)) // batch_size)
    embed_at = [k for k, j in enumerate(copy_from) if j < 0]
    windows: dict = {}
    for k in embed_at:
        windows.setdefault(k // window, []).append(k)
    batches = [inside[i:i + batch_size] for _, inside in sorted(windows.items())
               for i in range(0, len(inside), batch_size)]  # final positions of each batch
    # a commit never cuts a batch (so a resume cuts the same ones); if one did, its rows
    # before ``start`` are not written twice
    batches = [kept for b in batches if (kept := [k for k in b if k >= start])]
    todo = [k for b in batches for k in b]
    total, done = len(embed_at), len(embed_at) - len(todo)
    report = progress if callable(progress) else None
    pos = start

    def write(stop, embedded=None, skipped=()):
        """Rows ``pos..stop`` (copied, and the embedded ones given as {position: feats})."""
        nonlocal pos
        rows = [k for k in range(pos, stop) if copy_from[k] >= 0 or k in (embedded or {})]
        copied = [k for k in rows if copy_from[k] >= 0]
        got = old.read_rows([copy_from[k] for k in copied]) if copied else {}
        feats = {}
        for s in writer.specs:
            out = np.empty((len(rows), *s.row_shape), dtype=object if s.kind == "boxes"
                           else s.stored_dtype(dtype))
            at = {k: i for i, k in enumerate(rows)}
            if copied:
                out[[at[k] for k in copied]] = got[s.key]
            for k, v in (embedded or {}).items():
                out[at[k]] = v[s.key]
            feats[s.key] = out
        rs = [records[k] for k in rows]
        writer.write(feats, [r.path for r in rs], [r.label for r in rs], [r.split for r in rs],
                     stop - pos, list(skipped), [r.stamp for r in rs])
        pos = stop

    def copy_until(stop):
        while pos < stop:
            write(min(stop, pos + window))

    bar = tqdm(total=total, initial=done, unit="img", disable=progress is not True,
               desc=f"embed {bb.name} (update)", dynamic_ncols=True)
    with bar:
        if todo:
            queued = [records[k] for k in todo]
            index, n_seen = [], 0
            for b in batches:
                index.append(list(range(n_seen, n_seen + len(b))))
                n_seen += len(b)
            i = 0
            for rows, feats, skipped, n in _embedded(source, queued, bb, extractor, dev,
                                                     batch_size, num_workers, on_error,
                                                     writer.meta["dtype"], batches=index):
                where = todo[i:i + n]
                i += n
                copy_until(where[0])
                by_id = {r.path: j for j, r in enumerate(rows)}
                embedded = {k: {key: v[by_id[records[k].path]] for key, v in feats.items()}
                            for k in where if records[k].path in by_id}
                write(where[-1] + 1, embedded, skipped)
                bar.update(n)
                done += n
                if report is not None:
                    report(done, total)
                if skipped:
                    bar.set_postfix(skipped=writer.n_skipped + len(skipped), refresh=False)
        copy_until(len(records))
    writer.flush()
