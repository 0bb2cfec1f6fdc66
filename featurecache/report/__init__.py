"""Stage 3: the layer-depth comparison and its report.

:func:`compare` (in :mod:`.compare`) strings the steps together: the candidates' rows
(:mod:`.rows`, typed and frozen), the choice (:mod:`.select`, from selection scores only),
the fine-tunes as candidates (:mod:`.strategies`), the test split read once afterwards
(:mod:`.evaluate`) and the few-shot curves (:mod:`.fewshot`), the verdict as data
(:mod:`.verdict`), and one writer per format (:mod:`.writers`: CSV/JSON, markdown, plots,
:mod:`.html`), each registering the files it owns.
"""

from .compare import SELECT, CompareResult, compare
from .select import select_winner

__all__ = ["compare", "CompareResult", "SELECT", "select_winner"]
