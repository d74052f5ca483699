"""A named registry: the one mechanism behind the selection rules (:mod:`softlm_jax.rules`) and the
decompositions (:mod:`softlm_jax.svd`)."""
from __future__ import annotations

from typing import Any


class Registry:
  """``{name: entry}`` in registration order; ``kind`` names the entries in error messages (``"method"``,
  ``"decomposition"``). Each entry has a ``name`` attribute."""

  def __init__(self, kind: str, entry_type: type):
    self.kind = kind
    self.entry_type = entry_type
    self._entries: dict[str, Any] = {}

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
