"""Dense probes: which depth of the stored maps segments or detects best.

* :func:`segment` (``featurecache segment FEATS.h5 -o REPORT/``): per-cell heads on each
  stored map and hypercolumn, mIoU per probe, the winner chosen by CV grouped by image;
* :func:`detect` (``featurecache detect FEATS.h5 -o REPORT/``): centre-cell class + box
  regression per probe, mAP@0.5;
* :class:`DenseHead`: the saved head, predicting masks (PNG) or boxes (COCO JSON) for new
  images.

The feature file comes from ``featurecache embed SCENES/ --keep-map ...`` of a dense folder
(:mod:`featurecache.data.dense`). Nothing heavy is imported until a probe runs.
"""

from __future__ import annotations

__all__ = ["segment", "detect", "DenseHead"]


def __getattr__(name):
    if name == "segment":
        from .segment import segment

        return segment
    if name == "detect":
        from .detect import detect

        return detect
    if name == "DenseHead":
        from .model import DenseHead

        return DenseHead
    raise AttributeError(name)
