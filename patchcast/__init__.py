"""PatchCast composition root: the ``patchcast`` CLI wires configuration to the services in
``edge_node`` and ``inference_worker`` and to the pure core in ``shared``."""

from shared import __version__

__all__ = ["__version__"]
