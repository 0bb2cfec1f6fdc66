"""The HDF5 feature file: the one contract between the embed stage and everything after it.

Only this package touches h5py. The schema is in :mod:`.layout` and ``docs/schema.md``;
:mod:`.writer` commits rows crash-safely, :mod:`.reader` reads them, :mod:`.join` joins
shards.

Example::

    >>> ff = open_features("feats.h5")                       # doctest: +SKIP
    >>> ff.X("avgpool", "train").shape, ff.y("train").shape  # doctest: +SKIP
    ((1258, 1280), (1258,))
"""

from .join import join_shards
from .layout import IDENTITY_KEYS, SCHEMA_VERSION, fingerprint, partial_path
from .reader import FeatureFile, open_features
from .writer import Writer

__all__ = ["Writer", "FeatureFile", "open_features", "join_shards", "partial_path", "fingerprint",
           "SCHEMA_VERSION", "IDENTITY_KEYS"]
