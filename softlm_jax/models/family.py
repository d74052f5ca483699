"""Model families: one adapter object per family, and the registry the pipeline, the CLI and the bench
ask for a model.

A :class:`Family` knows how to load a model from a ``--model`` spec, run its logits, generate, describe
itself in a compact checkpoint's manifest and rebuild itself from that manifest. Everything outside
``softlm_jax/models/`` sees a :class:`Model` (a loaded model: module, dense params, tokenizer) and calls
its methods, never a family name. Adding a family is one new file in this package that subclasses
:class:`Family` and calls :func:`register`, plus its import in ``models/__init__.py``.

Kinds: ``"causal_lm"`` (``logits(params, ids (B, T) int32) -> (B, T, V)``) and ``"classifier"``
(``logits(params, inputs: {"input_ids", "attention_mask", ...} (B, L)) -> (B, num_labels)``).
"""
from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import sys
from typing import Any, Callable, Optional

from softlm_jax import data
from softlm_jax.intercept import intercept

KINDS = ("causal_lm", "classifier")

_FAMILIES: dict[str, "Family"] = {}
#: spec -> family name, for names that are not families themselves (e.g. "all-MiniLM-L6-v2")
_ALIASES: dict[str, str] = {}


@dataclasses.dataclass
class Model:
  """A loaded model of some :class:`Family`.

  Attributes:
    family: the adapter.
    name: the spec it was loaded from (``--model``), recorded as the compact file's ``source_model``.
    module: the Flax model (HF ``FlaxPreTrainedModel`` or a linen module).
    params: the dense parameter tree.
    tokenizer: its tokenizer (or None).
    tokenizer_source: where :func:`load_tokenizer` finds the tokenizer again.
    num_labels: classifiers: the head's width.
  """
  family: "Family"
  name: str
  module: Any
  params: Any
  tokenizer: Any = None
  tokenizer_source: str = ""
  num_labels: Optional[int] = None

  @property
  def kind(self) -> str:
    return self.family.kind

  @property
  def vocab_size(self) -> Optional[int]:
    """Rows of the token embedding (``module.config.vocab_size``; None when the module has none)."""
    n = getattr(getattr(self.module, "config", None), "vocab_size", None)
    return None if n is None else int(n)

  def check_ids(self, ids, what: str) -> None:
    """Refuses ids outside this model's vocabulary (:func:`softlm_jax.data.check_token_ids`)."""
    data.check_token_ids(ids, self.vocab_size, what)

  def logits(self, params, inputs, *, train: bool = False, rng=None):
    """Logits of ``inputs`` (see the module docstring for shapes); ``train``: dropout on with ``rng``."""
    return self.family.logits(self.module, params, inputs, train=train, rng=rng)

  def logits_fn(self) -> Callable:
    """``(params, inputs) -> logits`` in inference mode (for Grams, distillation, perplexity)."""
    return lambda p, x: self.logits(p, x)

  def hidden_fn(self) -> Callable:
    """``(params, inputs) -> (logits, hidden)`` in inference mode: ``hidden`` is the tuple of the
    residual stream's states ``(B, T, hidden)``, the embeddings' first and one per block (the family's
    own convention for the last: HF applies the final norm to it). For hidden-state distillation."""
    return lambda p, x: self.family.hidden(self.module, p, x)

  def generate(self, params, ids, *, max_new_tokens: int, cfg=None, attention_mask=None):
    """Greedy continuation ``(B, prompt + max_new_tokens)`` int32 (causal LMs), under ``intercept(cfg)``."""
    return self.family.generate(self.module, params, ids, max_new_tokens=max_new_tokens, cfg=cfg,
                                attention_mask=attention_mask)

  def manifest(self) -> tuple[dict, Optional[dict]]:
    """``(metadata fields, model_config dict)`` a compact checkpoint needs to rebuild this model."""
    return ({"family": self.family.name, "model_class": self.family.model_class(self.module),
             "source_model": self.name, "tokenizer": self.tokenizer_source},
            self.family.model_config(self.module))


class Family:
  """One model family's glue. Subclasses set ``name`` and ``kind`` and implement :meth:`load`;
  :meth:`logits`, :meth:`generate`, :meth:`model_class`, :meth:`model_config` and
  :meth:`from_manifest` default to the Hugging Face Flax conventions.

  ``include``: the default selection regex of :class:`softlm_jax.CompressionConfig` for this
  family (None: the library default, every 2-D kernel in a numbered block).
  """

  name: str = ""
  kind: str = "causal_lm"
  include: Optional[str] = None
  description: str = ""
  #: a catch-all (any HF folder): asked after the specific families
  generic: bool = False
  #: names a generic family loads without a folder (e.g. the embedded checkpoint), for error messages
  known: tuple = ()

  def load(self, spec: str, *, max_len: int = 512, seed: int = 0, num_labels: Optional[int] = None) -> Model:
    raise NotImplementedError

  def accepts(self, spec: str) -> bool:
    """Whether this family loads a spec that is not a registered name (HF folders)."""
    return False

  def unavailable(self, spec: str) -> Optional[str]:
    """Why ``spec`` cannot be loaded, found without loading it (None: it can be tried). A registered
    name's family returns None; a generic family says when a spec is neither a local folder nor a
    reachable hub name."""
    return None

  def logits(self, module, params, inputs, *, train: bool = False, rng=None):
    if self.kind == "classifier":
      kw = {"dropout_rng": rng} if train else {}
      return module(**inputs, params=params, train=train, **kw).logits
    kw = {"dropout_rng": rng} if train else {}
    return module(inputs, params=params, train=train, **kw).logits

  def hidden(self, module, params, inputs):
    """``(logits, hidden states tuple)`` of a causal LM in inference mode (:meth:`Model.hidden_fn`)."""
    if self.kind != "causal_lm":
      raise ValueError(f"hidden-state distillation is implemented for causal LMs; {self.name} is a {self.kind}")
    out = module(inputs, params=params, train=False, output_hidden_states=True)
    if out.hidden_states is None:
      raise ValueError(f"{self.name}: the model returned no hidden states for output_hidden_states=True")
    return out.logits, tuple(out.hidden_states)

  def generate(self, module, params, ids, *, max_new_tokens: int, cfg=None, attention_mask=None):
    if self.kind != "causal_lm":
      raise ValueError(f"{self.name} is a {self.kind}, not a causal language model: it cannot generate text")
    kw = {} if attention_mask is None else {"attention_mask": attention_mask}
    conf = module.config
    pad = conf.pad_token_id if conf.pad_token_id is not None else conf.eos_token_id
    with intercept(cfg):
      out = module.generate(ids, params=params, max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=pad if pad is not None else 0, **kw)
    return out.sequences

  def model_class(self, module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"

  def model_config(self, module) -> Optional[dict]:
    conf = getattr(module, "config", None)
    return conf.to_dict() if hasattr(conf, "to_dict") else None

  def from_manifest(self, info: dict, *, seed: int = 0, init: bool = False, dtype=None):
    """The module a compact checkpoint was saved from (no weights unless ``init``: random weights of
    the dense shapes, a reference for timing)."""
    meta = info.get("metadata") or {}
    if not meta.get("model_class") or not info.get("model_config"):
      raise ValueError("this compact checkpoint has no model_class / model_config: save it with "
                       "save_compact(..., model_config=..., metadata=model.manifest()[0]) to rebuild the model")
    from transformers import AutoConfig  # heavy: imported on use
    flax_deprecation_notice()
    conf = dict(info["model_config"])
    config = AutoConfig.for_model(conf.pop("model_type"), **conf)
    cls = import_object(meta["model_class"])
    kw = {} if dtype is None else {"dtype": dtype}
    return cls(config, seed=seed, **kw) if init else cls(config, _do_init=False, **kw)


_FLAX_DEPRECATION = "TensorFlow and JAX classes are deprecated"


class _DropFlaxDeprecation(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return _FLAX_DEPRECATION not in record.getMessage()


# transformers' own line, logged by every HF Flax model it builds; the adapter says it once instead
logging.getLogger("transformers.modeling_flax_utils").addFilter(_DropFlaxDeprecation())


def flax_deprecation_notice() -> None:
  """Says once per machine (a marker file in ``$SOFTLM_CACHE_DIR``, default ``~/.cache/softlm_jax``)
  that Hugging Face's Flax classes are deprecated and gone in transformers v5, and what does not need
  them. Called by the families that build HF Flax models; transformers' own warning is dropped."""
  root = os.environ.get("SOFTLM_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "softlm_jax"))
  marker = os.path.join(root, "hf_flax_notice_shown") if root not in ("0", "") else None
  if marker is not None and os.path.exists(marker):
    return
  print("note: Hugging Face's Flax model classes are deprecated in transformers 4.x and removed in v5; this "
        "model runs through them (transformers<5 is pinned). Flax NNX models (your nnx.Module, or --model "
        "smollm2-nnx) do not need them. (shown once)", file=sys.stderr)
  if marker is not None:
    try:
      os.makedirs(root, exist_ok=True)
      with open(marker, "w") as f:
        f.write("shown\n")
    except OSError:
      pass


def import_object(dotted: str):
  """``"package.module.Name"`` -> the object (a clear ValueError when it cannot be imported)."""
  module, _, name = dotted.rpartition(".")
  try:
    obj = importlib.import_module(module)
    for part in name.split("."):
      obj = getattr(obj, part)
    return obj
  except (ImportError, AttributeError) as e:
    raise ValueError(f"cannot import model class {dotted!r} ({e})") from None


def register(family: Family, *, aliases: tuple = ()) -> Family:
  """Adds ``family`` to the registry under ``family.name`` (and ``aliases``); returns it."""
  if not family.name or family.kind not in KINDS:
    raise ValueError(f"a family needs a name and a kind in {KINDS}, got {family.name!r}, {family.kind!r}")
  _FAMILIES[family.name] = family
  for a in aliases:
    _ALIASES[a] = family.name
  return family


def unregister(name: str) -> None:
  _FAMILIES.pop(name, None)
  for a in [a for a, n in _ALIASES.items() if n == name]:
    del _ALIASES[a]


def names(kind: Optional[str] = None) -> list[str]:
  """Registered family names (of one ``kind``), in registration order."""
  return [n for n, f in _FAMILIES.items() if kind is None or f.kind == kind]


def get(name: str) -> Family:
  name = _ALIASES.get(name, name)
  if name not in _FAMILIES:
    raise ValueError(f"unknown model family {name!r}; registered: {', '.join(_FAMILIES)}")
  return _FAMILIES[name]


def resolve(spec: str, kind: str) -> Family:
  """The family that loads ``spec`` as a model of ``kind``: a registered name, else the first family
  of that kind that accepts it (a Hugging Face folder or hub name)."""
  name = _ALIASES.get(spec, spec)
  if name in _FAMILIES:
    fam = _FAMILIES[name]
    if fam.kind != kind:
      raise ValueError(f"model {spec!r} is a {fam.kind}, but this task needs a {kind} "
                       f"(registered {kind} models: {', '.join(names(kind))}, or a HF folder)")
    return fam
  for fam in sorted(_FAMILIES.values(), key=lambda f: f.generic):
    if fam.kind == kind and fam.accepts(spec):
      return fam
  raise ValueError(f"no {kind} family loads {spec!r}; registered: {', '.join(names(kind))}, or a HF folder")


def check_spec(spec: str, kind: str) -> Family:
  """The family :func:`resolve` finds for ``spec``, after asking it whether ``spec`` is there
  (:meth:`Family.unavailable`): raises ValueError, one line naming the spec, the known ``kind`` names
  and why it is not there, before any data is loaded or weights are read."""
  fam = resolve(spec, kind)
  why = fam.unavailable(spec)
  if why:
    known = [n for f in _FAMILIES.values() if f.kind == kind for n in (f.known if f.generic else (f.name,))]
    raise ValueError(f"--model {spec!r}: {why}; known {kind} models: {', '.join(known)}, or a Hugging Face "
                     "model folder (or hub name when online)")
  return fam


def load(spec: str, kind: str, **kw) -> Model:
  """``resolve(spec, kind).load(spec, **kw)``."""
  return resolve(spec, kind).load(spec, **kw)


def family_of_manifest(info: dict) -> Family:
  """The family that wrote a compact checkpoint (its ``metadata["family"]``; older files: from the
  model class and the task)."""
  meta = info.get("metadata") or {}
  if meta.get("family") in _FAMILIES:
    return _FAMILIES[meta["family"]]
  kind = "causal_lm" if meta.get("task") == "wikitext" or not meta.get("num_labels") else "classifier"
  for fam in sorted(_FAMILIES.values(), key=lambda f: f.generic):
    if fam.kind == kind and fam.accepts(meta.get("source_model") or ""):
      return fam
  return next(f for f in _FAMILIES.values() if f.kind == kind)


def from_manifest(info: dict, **kw):
  """The module of a compact checkpoint (see :meth:`Family.from_manifest`)."""
  return family_of_manifest(info).from_manifest(info, **kw)


def load_tokenizer(source: str):
  """A tokenizer from a model folder / hub name, or a registered family's own (e.g. ``"smollm2"``)."""
  name = _ALIASES.get(source, source)
  if name in _FAMILIES and hasattr(_FAMILIES[name], "tokenizer"):
    return _FAMILIES[name].tokenizer()
  from transformers import AutoTokenizer  # heavy: imported on use
  return AutoTokenizer.from_pretrained(source)
