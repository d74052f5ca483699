"""A named registry: the one mechanism behind the selection rules (:mod:`softlm_jax.rules`) and the
decompositions (:mod:`softlm_jax.svd`), and the two registries themselves (:data:`METHODS`,
:data:`DECOMPOSITIONS`), which live here, below :mod:`softlm_jax.config`, so that the config checks a
name without importing the modules that fill them."""
from __future__ import annotations

from typing import Any


class Registry:
  """``{name: entry}`` in registration order; ``kind`` names the entries in error messages (``"method"``,
  ``"decomposition"``). Each entry has a ``name`` attribute and is an ``entry_type``."""

  def __init__(self, kind: str, entry_type: type = object):
    self.kind = kind
    self.entry_type = entry_type
    self._entries: dict[str, Any] = {}

  def holds(self, entry_type: type) -> "Registry":
    """Sets the type every entry must be (the module that defines that type calls this once); returns self."""
    self.entry_type = entry_type
    return self

  def add(self, entry: Any, *, replace: bool = False) -> Any:
    """Registers ``entry`` under ``entry.name`` and returns it; the name must be new unless ``replace``."""
    if not isinstance(entry, self.entry_type):
      raise TypeError(f"register expects a {self.entry_type.__module__}.{self.entry_type.__name__}, "
                      f"got {type(entry).__name__}")
    if entry.name in self._entries and not replace:
      raise ValueError(f"a {self.kind} named {entry.name!r} is registered already (pass replace=True to "
                       "replace it)")
    self._entries[entry.name] = entry
    return entry

  def remove(self, name: str) -> None:
    self.get(name)
    del self._entries[name]

  def get(self, name: str) -> Any:
    """The entry registered as ``name``; a ValueError listing the registered names otherwise."""
    try:
      return self._entries[name]
    except KeyError:
      raise ValueError(f"unknown {self.kind} {name!r}; expected one of {self.names()}") from None

  def names(self) -> tuple:
    return tuple(self._entries)

  def values(self) -> tuple:
    return tuple(self._entries.values())


#: The selection rules, ``CompressionConfig.method``: :class:`softlm_jax.rules.Rule` s, filled by
#: :func:`softlm_jax.rules.register`.
METHODS = Registry("method")
#: The decompositions, ``CompressionConfig.decomposition``: :class:`softlm_jax.svd.Decomposition` s, filled
#: by :func:`softlm_jax.svd.register`.
DECOMPOSITIONS = Registry("decomposition")
