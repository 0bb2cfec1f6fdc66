"""The verdict of a comparison as data: which layer, head and strategy wins, and how sure.

:func:`build_verdict` returns a :class:`Verdict`, a sequence of :class:`Span` (text, and
whether it names the winner), built from the rows alone; each format renders it
(:meth:`Verdict.markdown`, :meth:`Verdict.html`, :meth:`Verdict.plain`), so no writer parses
another's markup.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

from ..stats import SCORING_METRIC
from .rows import FROZEN
from .select import select_winner

__all__ = ["Span", "Verdict", "build_verdict", "verdict_text", "how_to_read"]


@dataclass(frozen=True)
class Span:
    text: str
    strong: bool = False    # the winner's name
    volatile: bool = False  # this run's own timing: not the same for the same inputs


@dataclass(frozen=True)
class Verdict:
    spans: tuple

    def markdown(self) -> str:
        return "".join(f"**{s.text}**" if s.strong else s.text for s in self.spans)

    def html(self) -> str:
        return "".join(f"<strong>{html.escape(s.text)}</strong>" if s.strong else
                       html.escape(s.text) for s in self.spans)

    def stable(self) -> "Verdict":
        """The verdict without this run's timings (the same inputs give the same text)."""
        return Verdict(tuple(s for s in self.spans if not s.volatile))

    def plain(self) -> str:
        return "".join(s.text for s in self.spans)

    def __add__(self, other: "Verdict") -> "Verdict":
        return Verdict(self.spans + other.spans)


class _Text:
    def __init__(self):
        self.spans = []

    def __iadd__(self, text: str):
        self.spans.append(Span(text))
        return self

    def strong(self, text: str) -> None:
        self.spans.append(Span(text, True))

    def volatile(self, text: str) -> None:
        self.spans.append(Span(text, volatile=True))

    def done(self) -> Verdict:
        return Verdict(tuple(s for s in self.spans if s.text))


def _tuned(r) -> bool:
    return r.get("strategy", FROZEN) != FROZEN


def _from_layer(r) -> str:
    return r["layer"].split("..")[0] if not hasattr(r, "origin") else r.origin.from_layer


def _name(r) -> str:
    return f"{r['backbone']} {r['layer']} ({r['head']})"


def build_verdict(rows, w, runner, scoring, select, several) -> Verdict:
    """The verdict paragraph: the winner and what chose it, its test scores, its lead over
    the runner-up (paired bootstrap), the shallowest layer, and the best of each other
    backbone."""
    metric = SCORING_METRIC[scoring]
    what = f"{w['backbone']} " if several else ""
    on_fold = "selected_on" in w  # compare --finetuned: every candidate on the same rows
    t = _Text()
    if on_fold:
        frozen = [r for r in rows if not _tuned(r)]
        tuned = [r for r in rows if _tuned(r)]
        best_f = max((r["select_score"] for r in frozen), default=float("nan"))
        best_t = max((r["select_score"] for r in tuned), default=float("nan"))
        if _tuned(w):
            t.strong(f"{w['strategy']} of the blocks above {_from_layer(w)}")
            t += f" ({w['folder']})"
        else:
            t.strong(f"{what}{w['layer']}")
            t += f" with a {w['head']} head"
        t += (f" is chosen by its {scoring} on the same rows as every other candidate: "
              f"the {w['selected_on']} that the fine-tune(s) picked their epoch on, "
              f"{w['select_score']:.3f} (best frozen head {best_f:.3f}, refit on the other "
              f"training rows with the parameters its CV chose; best fine-tune {best_t:.3f}, "
              f"its kept epoch). On the test split")
    elif _tuned(w):
        t.strong(f"{w['strategy']} of the blocks above {_from_layer(w)}")
        t += (f" ({w['folder']}) is chosen by its {scoring} on a validation fold of the "
              f"train split, {w['cv_score']:.3f} (the best of its epochs on {w['n_val']} "
              f"rows: optimistic), above every frozen head's CV score. On the test split")
    else:
        t.strong(f"{what}{w['layer']}")
        t += (f" with a {w['head']} head is chosen by cross-validation "
              f"on the train split: CV {scoring} {w['cv_score']:.3f} (± {w['cv_std']:.3f} over "
              f"the folds). On the test split")
    t += (f", read once for this report, it scores {metric} "
          f"{w[metric]:.3f} (95% CI {w[metric + '_lo']:.3f}-{w[metric + '_hi']:.3f}), "
          f"accuracy {w['accuracy']:.3f}, macro-F1 {w['macro_f1']:.3f}.")
    if select == "cv-1se":
        best = select_winner(rows, "cv")
        if best is not w:
            t += (f" (--select cv-1se: the best selection score was "
                  f"{best.get('select_score', best['cv_score']):.3f} by "
                  f"{_name(best)}; {w['layer']} is the narrowest and shallowest candidate "
                  f"within one standard error of it.)")
    if runner is not None:
        lead = w["lead_over_runner_up"]
        clear = lead["lo"] > 0 or lead["hi"] < 0
        t += (f" The runner-up{'' if on_fold else ' by CV'}, "
              f"{_name(runner) if several else runner['layer'] + ' (' + runner['head'] + ')'}"
              + (f" ({runner['select_score']:.3f} on the validation fold)" if on_fold else
                 f" (CV {runner['cv_score']:.3f})") +
              f", scores {runner[metric]:.3f} on test; the "
              f"paired bootstrap of the difference on the same test rows gives "
              f"{lead['difference']:+.3f} (95% CI {lead['lo']:+.3f} to {lead['hi']:+.3f}), so "
              + ("the difference is clear on this test set." if clear else
                 "this test set cannot tell the two apart."))
    same = [r for r in rows if r["backbone"] == w["backbone"] and not _tuned(r)]
    shallow = min(same, key=lambda r: (r["depth"], -r["cv_score"])) if same else w
    if shallow["layer"] != w["layer"]:
        t += (f" The shallowest layer compared, {shallow['layer']}, reaches "
              f"{shallow[metric]:.3f}.")
    if several:
        for b in dict.fromkeys(r["backbone"] for r in rows):
            if b != w["backbone"]:
                best_b = select_winner([r for r in rows if r["backbone"] == b], "cv")
                t += (f" Best of {b}: {best_b['layer']} ({best_b['head']}), CV "
                      f"{best_b['cv_score']:.3f}, test {best_b[metric]:.3f}.")
    return t.done()


def strategy_verdict(rows, best_frozen, metric: str, frozen_seconds: float) -> Verdict:
    """The verdict's sentences on fine-tuning: each fine-tuned row against the best frozen
    head (difference and paired-bootstrap interval on the same test rows), and the times."""
    tuned = [r for r in rows if _tuned(r)]
    t = _Text()
    if not tuned:
        return t.done()
    t += (f" Strategies: the best frozen head ({best_frozen['layer']}, {best_frozen['head']}) "
          f"scores {metric} {best_frozen[metric]:.3f} on test")
    t.volatile(f"; the frozen heads took {frozen_seconds:.0f} s in all (every layer and head, "
               f"CV included)")
    t += "."
    for r in tuned:
        m = r["margin_over_frozen"]
        clear = m["lo"] > 0 or m["hi"] < 0
        verdict = ("beats it" if m["lo"] > 0 else "is worse") if clear else \
            "cannot be told apart from it on this test set"
        t += (f" {r['strategy'].capitalize()} of the blocks above {_from_layer(r)} "
              f"(kept epoch {r['params']['epoch']} of {r['grid_evaluated']}, validation "
              f"{r['cv_score']:.3f} on {r['n_val']} rows) scores {r[metric]:.3f}: "
              f"{m['difference']:+.3f} (95% CI {m['lo']:+.3f} to {m['hi']:+.3f}, paired "
              f"bootstrap), so it {verdict}; it took "
              f"{r['seconds']:.0f} s ({r['seconds_per_epoch']} s per epoch).")
        if r["params"]["epoch"] == 0:
            t += (" It kept epoch 0: no epoch of fine-tuning beat its own linear probe on the "
                  "validation fold by more than the fold's noise, so it is that probe (a "
                  "logistic head) and was not a candidate for the choice.")
    return t.done()


def verdict_text(rows, w, runner, scoring, select, several) -> str:
    """The verdict paragraph in markdown (the winner in bold)."""
    return build_verdict(rows, w, runner, scoring, select, several).markdown()


def format_minutes(minutes: float) -> str:
    """``"12 min"``, ``"1,500 min"``; ``"40 s"`` below a minute."""
    return f"{minutes:,.0f} min" if minutes >= 1 else f"{minutes * 60:.0f} s"


def skipped_heads(settings) -> list:
    """One sentence per head compare did not run on a layer (``max_head_minutes``)."""
    return [f"Not run: {s['text']} (estimated at "
            f"{format_minutes(s['estimated_minutes'])} on 2 cores for {s['train_rows']:,} "
            f"training rows x {s['features']:,} features, above max_head_minutes "
            f"{settings['max_head_minutes']:g})." for s in settings.get("skipped", ())]


def how_to_read(data) -> str:
    """The paragraph under the table: what was chosen how, what the intervals are."""
    settings = data.settings
    return (f"How to read this: every head's hyperparameters and the winner are chosen by "
            f"{settings['cv']} cross-validation on the train split, scored by "
            f"{settings['scoring']}, on the same folds for every row (`--select "
            f"{settings['select']}`). The test split is read once, after the choice, to report: "
            f"intervals are bootstrap 95% intervals over the test rows, and the winner's lead over "
            f"the runner-up is a paired bootstrap on the same resamples. The grid column counts "
            f"the grid points evaluated on every fold; the others were skipped by early stopping "
            f"(see `cv_results` in the head files)."
            + (f" Few-shot columns: mean ± std of the test {data.metric} "
               f"over {settings['repeats']} seeded draws of k train images per class, refit with "
               f"the hyperparameters chosen on the full train split." if settings["shots"] else "")
            + (" Fine-tuned rows (strategy `fine-tune`): the grid column counts the epochs run of "
               "those asked, and the CV score is the score on the validation fold of the train "
               "split that picked the epoch (the best of its epochs on that fold, so optimistic). "
               "The winner is chosen by the selection score, on the same rows for every "
               "candidate: that validation fold, the frozen heads refit on the other training "
               "rows with the parameters their CV chose (± is the binomial standard error on the "
               "fold); the model is in its own folder (`featurecache predict "
               "FOLDER IMAGES`), and `best.joblib` is the best frozen head."
               if any(r.get("strategy", "frozen") != "frozen" for r in data.rows) else ""))
