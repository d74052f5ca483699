"""Frozen config dataclasses to JSON-able dicts and back: the one way configs go to disk."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def _plain(v: Any) -> Any:
  if isinstance(v, tuple):
    return [_plain(x) for x in v]
  return v


def to_dict(cfg: Any) -> dict:
  """The fields of a dataclass instance as a JSON-able dict (tuples become lists)."""
  return {f.name: _plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def from_dict(cls: type[T], d: Mapping) -> T:
  """``cls(**d)``, lists back to tuples where the field's default is a tuple (or the value was one);
  keys ``cls`` does not know are ignored (a newer writer's extra fields do not stop an older reader).

  ``from_dict(type(c), to_dict(c)) == c`` for every config of this library.
  """
  fields = {f.name: f for f in dataclasses.fields(cls)}
  kw = {}
  for k, v in d.items():
    if k not in fields:
      continue
    f = fields[k]
    tuple_field = isinstance(f.default, tuple) or "tuple" in str(f.type)
    kw[k] = tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) and tuple_field else v
  return cls(**kw)
