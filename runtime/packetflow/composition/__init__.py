"""Compositions: capabilities built from other capabilities (pipeline, parallel, ...).

``model`` holds the manifest models, ``check`` the load-time checks against contracts,
``executor`` turns a composition into a handler the engine runs, ``remote`` calls other
runtimes.
"""

from packetflow.composition.model import CompositionSpec, parse_composition

__all__ = ["CompositionSpec", "parse_composition"]
