"""Memory: XLA's peak bytes of a compiled function, and the bytes of weight trees."""
from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np

from softlm_jax import tree


def memory_stats(compiled) -> dict:
  """XLA's own account of a compiled function's memory (bytes); ``peak_bytes`` = arguments +
  outputs + temporaries - aliased (donated) buffers."""
  try:
    m = compiled.memory_analysis()
  except Exception as e:  # noqa: BLE001 (not every backend implements it)
    return {"error": f"{type(e).__name__}: {e}"}
  if m is None:
    return {"error": "memory_analysis() returned None"}
  keys = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes",
          "generated_code_size_in_bytes")
  out = {k.replace("_size_in_bytes", "_bytes"): int(getattr(m, k, 0) or 0) for k in keys}
  out["peak_bytes"] = out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
  return out


def tree_bytes(params) -> int:
  return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape)) for x in jax.tree.leaves(params)))


def linear_bytes(variant: Mapping, shapes: Mapping[str, tuple[int, int]]) -> int:
  total = 0
  for path, node in tree.iter_modules(variant):
    if tree.join(path) in shapes:
      total += sum(int(np.asarray(node[k]).nbytes) for k in ("kernel", "left", "right") if k in node)
  return total
