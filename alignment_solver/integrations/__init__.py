"""Plug-ins for federated-learning frameworks (``flower``: needs the ``flower`` extra)."""
