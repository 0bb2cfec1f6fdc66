"""What a report's writers are given: :class:`ReportData`."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..stats import SCORING_METRIC

__all__ = ["ReportData"]


@dataclass(frozen=True)
class ReportData:
    """Everything a writer may show: the rows (after the test scores), the winner, the
    verdict (data), the winner's confusion matrix, the settings, the test labels and every
    row's test predictions, and the fitted frozen heads by their file name."""

    files: list
    names: list
    rows: list
    winner: object
    verdict: object
    confusion: object
    settings: dict
    y_test: object = None
    preds: object = None
    heads: dict = field(default_factory=dict)
    best_head: str | None = None

    @property
    def classes(self) -> list:
        return self.files[0].classes

    @property
    def split_counts(self) -> tuple:
        splits = self.files[0].splits()
        return splits.count("train"), splits.count("test")

    @property
    def sources(self) -> list:
        return [{"name": n, "feature_file": str(ff.path), "backbone": ff.provenance["backbone"],
                 "weights": ff.provenance["weights"]} for n, ff in zip(self.names, self.files)]

    @property
    def metric(self) -> str:
        return SCORING_METRIC[self.settings["scoring"]]
