"""The choice of a comparison's winner, from selection scores only (never the test split)."""

from __future__ import annotations

from ..errors import HeadOptionError
from ..options import SELECT

__all__ = ["select_winner", "SELECT", "LP_FT"]

LP_FT = "lp-ft"  # the head column of a fine-tuned model


def _cost(head: str) -> int:
    """A head kind's cost rank (cheaper first, for the one-SE rule); a fine-tune after all."""
    from .. import kinds

    return 1_000 if head == LP_FT else kinds.cost(head)


def select_winner(rows, select: str = "cv"):
    """The row chosen from CV scores only (never from the test split).

    ``cv``: the highest mean CV score (ties: the narrower, then shallower, then cheaper head).
    ``cv-1se``: among the rows whose CV score is within one standard error of the best, the
    narrowest, then shallowest, then cheapest. When every row has a ``select_score`` (all
    candidates scored on the same validation fold, as ``compare --finetuned`` does), that
    score and its ``select_sem`` are used instead of the CV score.
    """
    def simplicity(r):
        return (r["dim"], r["rel_depth"], _cost(r["head"]))

    key, sem = ("select_score", "select_sem") if rows and all("select_score" in r for r in rows) \
        else ("cv_score", "cv_sem")
    best = min(rows, key=lambda r: (-r[key], simplicity(r)))
    if select == "cv":
        return best
    if select != "cv-1se":
        raise HeadOptionError(f"select {select!r} is not one of {', '.join(SELECT)}.")
    floor = best[key] - best[sem]
    return min((r for r in rows if r[key] >= floor), key=simplicity)
