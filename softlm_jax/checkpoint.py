"""Compact checkpoints: the exported (cut-to-rank) tree on disk, and back, at its compact size.

One file, ``<name>.safetensors``: the arrays under flat ``'/'``-joined keys (``bert/encoder/layer/0/
attention/self/query/left``), and in the safetensors header's metadata, under ``"softlm"``, a JSON
manifest::

  format            "softlm-compact"
  format_version    FORMAT_VERSION (load refuses other versions)
  library_version   softlm_jax.__version__ of the writer
  method            "softlm" / "llrc" / "static_svd" / ... (from ``metadata["method"]``, else ``cfg.method``)
  target_ratio      cfg.target_ratio (the CR asked for); achieved_ratio, counted_params, dense_params
  layers            {path: {"rank", "shape", "break_even", "params", "form": "factored" | "dense"}}:
                    :func:`softlm_jax.budget.budget_report`, the one counting source
  arrays            {key: {"shape", "dtype", "sha256"}} of every array in the file; ``sha256`` is the hex
                    digest of the array's raw bytes as stored (C order, little-endian), checked on load
  dtype             the floating dtype of the parameters ("float32", "bfloat16", or "mixed")
  source_model      ``metadata["source_model"]`` (e.g. "minilm", a HF name or path) or null
  compression       the CompressionConfig fields; model_config: the HF config dict (or null)
  metadata          the caller's ``metadata`` (JSON-able)
  manifest_sha256   hex sha256 of the canonical JSON (sorted keys, no spaces) of every other field

Any safetensors reader opens the file (``safetensors.safe_open(path, "flax").metadata()["softlm"]``
is the manifest). The bytes on disk are the compact parameters plus the header: no optimizer state,
no singular values, no thresholds. A training-form tree (thresholds or masks still in it) is refused:
export it first (:func:`softlm_jax.export_params`).

:func:`load_compact` checks what the file claims against what it holds:

* always: every array's shape and dtype against the manifest, and every claim that the arrays
  determine, recomputed from them with :func:`softlm_jax.budget.budget_report` (each layer's rank,
  shape, form, break-even rank and counted parameters; ``counted_params``, ``dense_params``,
  ``target_params``, ``achieved_ratio``, ``dtype``); a disagreement raises :class:`CheckpointError`
  naming the field and both values;
* with ``verify=True`` (the default) also the digests: the manifest's own (``manifest_sha256``) and
  every array's sha256 recomputed from the bytes in the file (a flipped bit anywhere in the arrays or
  an edited manifest field). ``verify=False`` skips only the digests. Files written before the
  digests existed load with a warning.

The write is atomic (:func:`softlm_jax.files.atomic_write`): the file is written to a temporary name in
the destination folder, flushed to disk, then renamed over ``path``. An interrupted save (Ctrl-C,
``kill -9``) leaves the previous file (or nothing) at ``path``, never a half-written file that loads.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import mmap
import os
import warnings
from collections.abc import Mapping
from typing import Any, Optional, Union

import jax.numpy as jnp
import numpy as np

from softlm_jax import budget, files, rules, tree
from softlm_jax._version import __version__
from softlm_jax.config import CompressionConfig

FORMAT = "softlm-compact"
FORMAT_VERSION = 1
MANIFEST_KEY = "softlm"


class CheckpointError(ValueError):
  """A compact checkpoint that cannot be loaded: corrupt, another format version, or arrays that
  disagree with the manifest. The message names the file and the key."""


def _dtype_name(flat: Mapping[str, Any]) -> str:
  names = {str(jnp.asarray(v).dtype) for v in flat.values() if jnp.issubdtype(jnp.asarray(v).dtype, jnp.floating)}
  return names.pop() if len(names) == 1 else ("mixed" if names else "none")


def _config_dict(cfg: CompressionConfig) -> dict:
  return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}


def config_from_manifest(info: Mapping) -> CompressionConfig:
  """The :class:`CompressionConfig` a checkpoint was saved with (fields this version does not know are
  ignored, so a newer writer's extra options do not stop an older reader)."""
  known = {f.name for f in dataclasses.fields(CompressionConfig)}
  conf = {k: (tuple(v) if isinstance(v, list) else v) for k, v in (info.get("compression") or {}).items()
          if k in known}
  return CompressionConfig(**conf)


def _model_config_dict(model_config) -> Optional[dict]:
  if model_config is None:
    return None
  if hasattr(model_config, "to_dict"):
    return model_config.to_dict()
  if isinstance(model_config, Mapping):
    return dict(model_config)
  raise TypeError(f"model_config must be a transformers config, a dict or None, got {type(model_config).__name__}")


def manifest(params: Mapping, cfg: Optional[CompressionConfig] = None, *, model_config=None,
             metadata: Optional[Mapping] = None) -> dict:
  """The manifest :func:`save_compact` writes for an exported tree (see the module docstring).

  Raises ValueError naming the layer when ``params`` is in training form.
  """
  cfg = cfg or CompressionConfig()
  for path, layer in tree.factored_layers(params):
    if budget.has_selection(layer):
      held = list(rules.rule_of(layer).keys)
      raise ValueError(f"layer '{path}' is in training form (it has {held}):"
                       " a compact checkpoint holds the exported tree; call softlm_jax.export_params(params, cfg) "
                       "first (or save the training state with softlm_jax.train.save_checkpoint)")
  flat = tree.flatten(params)
  rep = budget.budget_report(params, cfg)
  factored = {p for p, _ in tree.factored_layers(params)}
  layers = {p: {**v, "form": "factored" if p in factored else "dense"} for p, v in rep["layers"].items()}
  metadata = dict(metadata or {})
  man = {
      "format": FORMAT, "format_version": FORMAT_VERSION, "library_version": __version__,
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "method": metadata.get("method", cfg.method), "target_ratio": cfg.target_ratio,
      "achieved_ratio": rep["achieved_ratio"], "counted_params": rep["counted_params"],
      "dense_params": rep["dense_params"], "target_params": rep["target_params"],
      "source_model": metadata.get("source_model"), "dtype": _dtype_name(flat),
      "layers": layers,
      "arrays": {k: {"shape": list(np.shape(v)), "dtype": str(jnp.asarray(v).dtype), "sha256": array_digest(v)}
                 for k, v in flat.items()},
      "compression": _config_dict(cfg), "model_config": _model_config_dict(model_config), "metadata": metadata,
  }
  man["manifest_sha256"] = manifest_digest(man)
  return man


def manifest_digest(man: Mapping) -> str:
  """Hex sha256 of a manifest's canonical JSON (sorted keys, ``(",", ":")`` separators), every field
  but ``manifest_sha256`` itself."""
  body = {k: v for k, v in man.items() if k != "manifest_sha256"}
  return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def array_digest(x) -> str:
  """Hex sha256 of an array's raw bytes (C order, native little-endian), as safetensors stores them."""
  return hashlib.sha256(np.ascontiguousarray(np.asarray(x)).reshape(-1).view(np.uint8)).hexdigest()


def file_digests(path: Union[str, os.PathLike]) -> dict[str, str]:
  """``{key: hex sha256}`` of every tensor's bytes in a safetensors file, read straight from its data
  section (the header's ``data_offsets``; no framework, any dtype). Raises CheckpointError if the
  header is unreadable or a tensor's bytes lie past the end of the file."""
  path = os.fspath(path)
  with open(path, "rb") as f:
    size = os.fstat(f.fileno()).st_size
    try:
      n = int.from_bytes(f.read(8), "little")
      header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError) as e:
      raise CheckpointError(f"{path}: not a readable safetensors header ({e}); "
                            "it may be truncated or corrupt") from None
    base = 8 + n
    out = {}
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
      view = memoryview(mm)
      try:
        for key, spec in header.items():
          if key == "__metadata__":
            continue
          begin, end = spec["data_offsets"]
          if base + end > size:
            raise CheckpointError(f"{path}: key '{key}' ends at byte {base + end}, the file has {size}; "
                                  "it is truncated or corrupt")
          out[key] = hashlib.sha256(view[base + begin:base + end]).hexdigest()
      finally:
        view.release()
  return out


def verify_digests(path: Union[str, os.PathLike], man: Mapping) -> None:
  """Checks the manifest against its own ``manifest_sha256`` and every array's bytes in ``path`` against
  the manifest's ``sha256``; raises CheckpointError naming the file and what differs. A manifest
  without digests (a file written before they existed) warns."""
  path = os.fspath(path)
  if "manifest_sha256" in man:
    got_man = manifest_digest(man)
    if got_man != man["manifest_sha256"]:
      raise CheckpointError(f"{path}: the manifest fails its checksum (sha256 {got_man[:12]}..., the file says "
                            f"{str(man['manifest_sha256'])[:12]}...): a field of the manifest was edited or is "
                            "corrupt; re-export the model")
  else:
    warnings.warn(f"{path}: the manifest has no manifest_sha256 (written by softlm_jax "
                  f"{man.get('library_version')}); its fields are checked against the arrays only", stacklevel=3)
  want = {k: v.get("sha256") for k, v in man["arrays"].items()}
  if not any(want.values()):
    warnings.warn(f"{path}: the manifest has no array digests (written by softlm_jax "
                  f"{man.get('library_version')}); loaded without an integrity check", stacklevel=3)
    return
  got = file_digests(path)
  for key, digest in want.items():
    if digest is None:
      raise CheckpointError(f"{path}: key '{key}' has no sha256 in the manifest while others do")
    if got.get(key) != digest:
      raise CheckpointError(f"{path}: key '{key}' fails its checksum (sha256 {str(got.get(key))[:12]}..., the "
                            f"manifest says {digest[:12]}...): the file is corrupt; re-export or copy it again")


def save_compact(path: Union[str, os.PathLike], params: Mapping, *, cfg: Optional[CompressionConfig] = None,
                 model_config=None, metadata: Optional[Mapping] = None) -> dict:
  """Saves an exported tree as a compact checkpoint (one ``.safetensors`` file), atomically.

  Args:
    path: the file to write (its folder is created).
    params: an exported tree (:func:`softlm_jax.export_params` / :func:`softlm_jax.static_svd`): factored
      layers ``left (rows, r)``, ``right (r, cols)`` and dense modules; arrays of any dtype.
    cfg: the compression config (selection regexes, CR); default ``CompressionConfig()``.
    model_config: the model's ``transformers`` config (or its dict) to rebuild the model; optional.
    metadata: JSON-able extras, e.g. ``{"method": "softlm", "source_model": "minilm", "model_class": ...}``.

  Returns:
    The manifest written. Raises ValueError for a training-form tree (export first).
  """
  path = os.fspath(path)
  man = manifest(params, cfg, model_config=model_config, metadata=metadata)
  tensors = {k: jnp.asarray(v) for k, v in tree.flatten(params).items()}
  from safetensors.flax import save  # safetensors' flax writer
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  files.atomic_write(path, save(tensors, metadata={MANIFEST_KEY: json.dumps(man)}))
  return man


def read_manifest(path: Union[str, os.PathLike]) -> dict:
  """The manifest of a compact checkpoint, without reading the arrays (header only)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"compact checkpoint {path} does not exist")
  from safetensors import safe_open
  try:
    with safe_open(path, framework="flax") as f:
      meta = f.metadata() or {}
  except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for bad headers
    raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e}); "
                          "it may be truncated or corrupt") from None
  if MANIFEST_KEY not in meta:
    raise CheckpointError(f"{path}: no '{MANIFEST_KEY}' manifest in the safetensors metadata (keys: "
                          f"{sorted(meta)}); it was not written by softlm_jax.save_compact")
  try:
    man = json.loads(meta[MANIFEST_KEY])
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: the manifest is not valid JSON ({e})") from None
  if man.get("format") != FORMAT:
    raise CheckpointError(f"{path}: format {man.get('format')!r}, expected {FORMAT!r}")
  if man.get("format_version") != FORMAT_VERSION:
    raise CheckpointError(f"{path}: format_version {man.get('format_version')!r} is not supported by this "
                          f"softlm_jax (reads version {FORMAT_VERSION}); written by softlm_jax "
                          f"{man.get('library_version')}")
  return man


def _check(path: str, man: Mapping, flat: Mapping[str, Any]) -> None:
  arrays = man["arrays"]
  missing, extra = sorted(set(arrays) - set(flat)), sorted(set(flat) - set(arrays))
  if missing:
    raise CheckpointError(f"{path}: key '{missing[0]}' is in the manifest but not in the file "
                          f"({len(missing)} missing)")
  if extra:
    raise CheckpointError(f"{path}: key '{extra[0]}' is in the file but not in the manifest")
  for key, spec in arrays.items():
    got = list(np.shape(flat[key]))
    if got != list(spec["shape"]):
      raise CheckpointError(f"{path}: key '{key}' has shape {tuple(got)}, the manifest says {tuple(spec['shape'])}")
    if str(flat[key].dtype) != spec["dtype"]:
      raise CheckpointError(f"{path}: key '{key}' has dtype {flat[key].dtype}, the manifest says {spec['dtype']}")
  for layer, spec in man["layers"].items():
    rows, cols = spec["shape"]
    if spec["form"] == "factored":
      want = {f"{layer}/left": [rows, spec["rank"]], f"{layer}/right": [spec["rank"], cols]}
    else:
      want = {f"{layer}/kernel": [rows, cols]}
    for key, shape in want.items():
      if key not in flat:
        raise CheckpointError(f"{path}: layer '{layer}' ({spec['form']}, rank {spec['rank']}) needs key '{key}'")
      if list(np.shape(flat[key])) != shape:
        raise CheckpointError(f"{path}: key '{key}' has shape {tuple(np.shape(flat[key]))}, but layer '{layer}' "
                              f"at rank {spec['rank']} of {tuple(spec['shape'])} needs {tuple(shape)}")


def load_compact(path: Union[str, os.PathLike], *, verify: bool = True) -> tuple[dict, dict]:
  """Loads a compact checkpoint: ``(params, info)``.

  ``verify`` (default True): check the manifest's digest and recompute every array's sha256 from the
  file (:func:`verify_digests`); False skips only those digests (faster): shapes, dtypes, ranks and
  every count the manifest claims are still recomputed from the arrays (:func:`check_claims`).

  ``params``: the exported tree (nested dicts of ``jax.Array``, the saved dtypes), to run under
  :func:`softlm_jax.intercept`; ``info``: the manifest. Raises FileNotFoundError or
  :class:`CheckpointError` naming the file and the key or field.
  """
  path = os.fspath(path)
  man = read_manifest(path)
  from safetensors import safe_open
  try:
    with safe_open(path, framework="flax") as f:
      flat = {k: f.get_tensor(k) for k in f.keys()}
  except Exception as e:  # noqa: BLE001
    raise CheckpointError(f"{path}: cannot read the arrays ({type(e).__name__}: {e}); "
                          "the file may be truncated or corrupt") from None
  _check(path, man, flat)
  if verify:
    verify_digests(path, man)
  params = tree.unflatten(flat)
  check_claims(path, man, params)
  return params, man


#: the manifest's totals that the arrays determine (:func:`softlm_jax.budget.budget_report`)
RECOMPUTED = ("counted_params", "dense_params", "target_params", "achieved_ratio")


def check_claims(path: Union[str, os.PathLike], man: Mapping, params: Mapping) -> None:
  """Recomputes every claim of ``man`` that the arrays of ``params`` determine and raises
  :class:`CheckpointError` naming the file, the field and both values at the first disagreement: each
  layer's ``rank``, ``shape``, ``form``, ``break_even`` and ``params``; the totals :data:`RECOMPUTED`
  (with the manifest's own CompressionConfig, whose ``target_ratio`` must equal the manifest's);
  the parameters' ``dtype``."""
  path = os.fspath(path)
  cfg = config_from_manifest(man)

  def refuse(field, claimed, actual):
    raise CheckpointError(f"{path}: the manifest says {field} = {claimed!r}, the arrays give {actual!r}: the "
                          "manifest does not describe this file (edited or corrupt); re-export the model")

  if man.get("target_ratio") != cfg.target_ratio:
    refuse("target_ratio", man.get("target_ratio"), cfg.target_ratio)
  rep = budget.budget_report(params, cfg)
  factored = {p for p, _ in tree.factored_layers(params)}
  got = {p: {**v, "form": "factored" if p in factored else "dense"} for p, v in rep["layers"].items()}
  claimed = man.get("layers") or {}
  for layer in sorted(set(claimed) | set(got)):
    if layer not in got:
      refuse(f"layers['{layer}']", claimed[layer], None)
    if layer not in claimed:
      refuse(f"layers['{layer}']", None, got[layer])
    for field in ("form", "shape", "rank", "break_even", "params"):
      if claimed[layer].get(field) != got[layer][field]:
        refuse(f"layers['{layer}'].{field}", claimed[layer].get(field), got[layer][field])
  for field in RECOMPUTED:
    if man.get(field) != rep[field]:
      refuse(field, man.get(field), rep[field])
  dtype = _dtype_name(tree.flatten(params))
  if man.get("dtype") != dtype:
    refuse("dtype", man.get("dtype"), dtype)


GENERATIVE_CLASS_MARKS = ("CausalLM", "LMHeadModel", "ForConditionalGeneration")
CLASSIFIER_CLASS_MARKS = ("ForSequenceClassification", "ForTokenClassification", "ForMultipleChoice",
                          "ForQuestionAnswering")


def model_kind(man: Mapping) -> str:
  """``"generative"``, ``"classifier"`` or ``"unknown"`` from a manifest: its ``metadata["model_class"]``
  (e.g. ``...FlaxBertForSequenceClassification``), else the model config's ``architectures``, else a
  ``num_labels`` in the metadata (written for classifiers and regressors only)."""
  meta = man.get("metadata") or {}
  names = [meta.get("model_class") or ""] + list((man.get("model_config") or {}).get("architectures") or [])
  for name in names:
    if any(m in name for m in CLASSIFIER_CLASS_MARKS):
      return "classifier"
    if any(m in name for m in GENERATIVE_CLASS_MARKS):
      return "generative"
  return "classifier" if "num_labels" in meta else "unknown"


def require_generative(man: Mapping, path: Union[str, os.PathLike, None] = None) -> None:
  """Raises ValueError (one line, naming the file, the model class and the task) when the manifest
  says the model is a classifier: text generation needs a causal language model. Unknown kinds pass."""
  if model_kind(man) != "classifier":
    return
  meta = man.get("metadata") or {}
  cls = (meta.get("model_class") or "?").rsplit(".", 1)[-1]
  what = f"{cls}, task {meta.get('task')!r}, {meta.get('num_labels', '?')} label(s)"
  raise ValueError(f"{os.fspath(path) if path is not None else 'this checkpoint'} is a classifier ({what}), "
                   "not a causal language model: `softlm generate` needs one (e.g. a --task wikitext run); "
                   "use `softlm eval` for a classifier")


def file_report(path: Union[str, os.PathLike]) -> dict:
  """Sizes of a compact checkpoint (plain ints): ``file_bytes``, ``header_bytes`` (JSON header incl.
  manifest), ``array_bytes``; ``params`` (every array's elements) = ``counted_params`` (the compressed
  linears, :func:`softlm_jax.count_params`) + ``other_params`` (embeddings, norms, biases, heads), and
  both times 4 bytes (float32) for comparison with the file."""
  path = os.fspath(path)
  man = read_manifest(path)
  with open(path, "rb") as f:
    header = 8 + int.from_bytes(f.read(8), "little")
  arrays = man["arrays"].values()
  array_bytes = sum(int(np.prod(s["shape"])) * jnp.dtype(s["dtype"]).itemsize for s in arrays)
  total = sum(int(np.prod(s["shape"])) for s in arrays)
  return {"file_bytes": os.path.getsize(path), "header_bytes": header, "array_bytes": array_bytes,
          "params": total, "counted_params": man["counted_params"], "other_params": total - man["counted_params"],
          "params_x4_bytes": 4 * total, "counted_params_x4_bytes": 4 * man["counted_params"]}

