"""featurecache: embed images once with a frozen backbone, then compare layers with shallow heads.

Public surface::

    featurecache.embed(source, "feats.h5", layers=["blocks.5", "avgpool"])   # stage 1
    ff = featurecache.open_features("feats.h5")                              # the file
    ff.X("avgpool", "train"), ff.y("train"), ff.classes
"""

__version__ = "0.1.0"

from .backbones import available_backbones, load_backbone  # noqa: E402
from .embed import embed  # noqa: E402
from .layers import list_layers  # noqa: E402
from .store import open_features  # noqa: E402

__all__ = ["embed", "open_features", "load_backbone", "available_backbones", "list_layers",
           "__version__"]
