"""The ``featurecache`` command: a thin click layer over the package's plain functions.

``app`` holds the group, the error handling and ``run``; ``data_commands`` the commands on
backbones and feature files; ``head_commands`` those on heads and reports; ``finetune_commands`` the fine-tuning; ``dense_commands`` the dense probes. Importing this
package registers them all.
"""

from . import data_commands, dense_commands, finetune_commands, head_commands  # noqa: F401 - registers the commands on the group
from .app import cli, main

__all__ = ["cli", "main"]
