"""Mamba (v1) in Flax linen, mirroring Hugging Face ``MambaForCausalLM``, with a recurrent decoder.

The parameter tree follows HF's names, so the library's default selection finds the block linears::

  embeddings/embedding                 (vocab, hidden)          HF backbone.embeddings.weight
  layers/<i>/norm/weight               (hidden,)                HF backbone.layers.<i>.norm.weight
  layers/<i>/mixer/in_proj/kernel      (hidden, 2*inter)  [+bias]   nn.Dense, in x out
  layers/<i>/mixer/conv1d/kernel       (conv_kernel, 1, inter) [+bias (inter,)]  depthwise, nn.Conv layout
  layers/<i>/mixer/x_proj/kernel       (inter, dt_rank + 2*state)   nn.Dense, no bias
  layers/<i>/mixer/dt_proj/kernel      (dt_rank, inter) + bias      nn.Dense
  layers/<i>/mixer/A_log               (inter, state)
  layers/<i>/mixer/D                   (inter,)
  layers/<i>/mixer/out_proj/kernel     (inter, hidden)    [+bias]   nn.Dense, in x out
  norm_f/weight                        (hidden,)
  lm_head/kernel                       (hidden, vocab)  only when tie_word_embeddings is False

``inter = expand * hidden``. Every linear is a plain ``flax.linen.Dense``, so
``CompressionConfig(include=r"layers/\\d+/mixer/(in_proj|out_proj)")`` (or the default pattern, which
also takes ``x_proj``/``dt_proj`` and skips the 3-D conv kernel) compresses them and
:func:`softlm_jax.intercept` runs training-form and exported trees.

Usage::

  model, params = load_mamba_safetensors("path/to/mamba-130m-hf")
  logits = model.apply({"params": params}, input_ids)             # (batch, seq, vocab) float32
  tokens = model.generate(params, prompt_ids, max_new_tokens=20)   # greedy, jit-friendly

Everything is jit-friendly: the selective scan is a ``jax.lax.scan`` over time, generation a
``lax.scan`` over decode steps; only the layer loop is a Python loop (over modules, not data).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Mapping
from typing import Any, NamedTuple, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from softlm_jax.intercept import intercept
from softlm_jax.models import family, hf

Array = jax.Array

# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MambaConfig:
  """Mamba v1 hyper-parameters (the fields of HF ``transformers.MambaConfig`` that the model uses).

  ``time_step_rank="auto"`` means ``ceil(hidden_size / 16)``; ``intermediate_size`` is
  ``expand * hidden_size``. ``initializer_range`` and the ``time_step_*`` fields only affect random
  initialisation (as in HF). Build one from an HF config, a ``config.json`` dict or another
  ``MambaConfig`` with :meth:`from_any`.
  """

  vocab_size: int = 50280
  hidden_size: int = 768
  state_size: int = 16
  num_hidden_layers: int = 32
  expand: int = 2
  conv_kernel: int = 4
  time_step_rank: Union[int, str] = "auto"
  layer_norm_epsilon: float = 1e-5
  use_bias: bool = False
  use_conv_bias: bool = True
  residual_in_fp32: bool = True
  tie_word_embeddings: bool = True
  hidden_act: str = "silu"
  initializer_range: float = 0.1
  time_step_scale: float = 1.0
  time_step_min: float = 0.001
  time_step_max: float = 0.1
  time_step_floor: float = 1e-4

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "state_size", "num_hidden_layers", "expand", "conv_kernel"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
        raise ValueError(f"MambaConfig.{name} must be a positive int, got {v!r}")
    r = self.time_step_rank
    if r != "auto" and (isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r <= 0):
      raise ValueError(f"MambaConfig.time_step_rank must be 'auto' or a positive int, got {r!r}")
    if self.hidden_act != "silu":
      raise ValueError(f"MambaConfig.hidden_act: only 'silu' is implemented, got {self.hidden_act!r}")
    if not self.layer_norm_epsilon > 0:
      raise ValueError(f"MambaConfig.layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon!r}")

  @property
  def intermediate_size(self) -> int:
    return int(self.expand * self.hidden_size)

  @property
  def dt_rank(self) -> int:
    """The resolved ``time_step_rank``."""
    return math.ceil(self.hidden_size / 16) if self.time_step_rank == "auto" else int(self.time_step_rank)

  @classmethod
  def from_any(cls, cfg: Any) -> "MambaConfig":
    """From a ``MambaConfig``, an HF ``transformers.MambaConfig`` (or any object with the same
    attributes) or a ``config.json`` dict (HF names, or the original ``d_model``/``n_layer`` names of
    state-spaces checkpoints, whose vocabulary is padded to ``pad_vocab_size_multiple``)."""
    if isinstance(cfg, cls):
      return cfg
    if isinstance(cfg, Mapping):
      d = dict(cfg)
      if "hidden_size" not in d and "d_model" in d:  # original state-spaces config.json
        d["hidden_size"] = d["d_model"]
        d["num_hidden_layers"] = d.get("n_layer", d.get("num_hidden_layers"))
        d.setdefault("tie_word_embeddings", d.get("tie_embeddings", True))
        mult = int(d.get("pad_vocab_size_multiple", 1) or 1)
        if "vocab_size" in d and d["vocab_size"] % mult:
          d["vocab_size"] += mult - d["vocab_size"] % mult
        ssm = d.get("ssm_cfg") or {}
        for src, dst in (("d_state", "state_size"), ("d_conv", "conv_kernel"), ("expand", "expand"),
                         ("dt_rank", "time_step_rank"), ("conv_bias", "use_conv_bias"), ("bias", "use_bias")):
          if src in ssm:
            d[dst] = ssm[src]
      get = d.get
      has = d.__contains__
    else:
      def get(k, default=None):
        return getattr(cfg, k, default)

      def has(k):
        return hasattr(cfg, k)
    kwargs = {f.name: get(f.name) for f in dataclasses.fields(cls) if has(f.name) and get(f.name) is not None}
    return cls(**kwargs)


class MambaCache(NamedTuple):
  """Recurrent state of every layer (a pytree; the layer axis is first).

  conv_state: ``(num_layers, batch, intermediate, conv_kernel)``, model dtype: the last
    ``conv_kernel`` inputs of each depthwise conv (after ``in_proj``, before the conv), oldest first,
    zeros before the sequence start (HF ``MambaCache.conv_states`` layout).
  ssm_state: ``(num_layers, batch, intermediate, state_size)`` float32: the selective-scan state ``h``.
  """

  conv_state: Array
  ssm_state: Array


# --------------------------------------------------------------------------------------------------
# The math, as pure functions
# --------------------------------------------------------------------------------------------------


def causal_depthwise_conv1d(u: Array, kernel: Array, bias: Optional[Array] = None,
                            prev: Optional[Array] = None) -> Array:
  """Causal depthwise 1-D convolution (torch ``Conv1d(groups=channels, padding=K-1)[..., :L]``).

  ``y[b, t, c] = bias[c] + sum_k kernel[k, 0, c] * x[b, t + k, c]`` with ``x = concat(prev, u)``
  along time, i.e. ``kernel[K-1]`` weights the current input and ``kernel[0]`` the one ``K-1`` steps back.

  Args:
    u: ``(batch, seq, channels)``.
    kernel: ``(K, 1, channels)`` (flax ``nn.Conv`` layout with ``feature_group_count=channels``;
      torch's ``(channels, 1, K)`` weight transposed by ``(2, 1, 0)``).
    bias: ``(channels,)`` or None.
    prev: ``(batch, K-1, channels)``: the ``K-1`` inputs before ``u`` (zeros when None: sequence start).

  Returns:
    ``(batch, seq, channels)`` in the promoted dtype of ``u`` and ``kernel``.
  """
  k_size = kernel.shape[0]
  batch, seq, ch = u.shape
  if prev is None:
    prev = jnp.zeros((batch, k_size - 1, ch), u.dtype)
  x = jnp.concatenate([prev.astype(u.dtype), u], axis=1)  # (batch, seq + K - 1, channels)
  y = sum(x[:, k:k + seq, :] * kernel[k, 0, :] for k in range(k_size))
  return y if bias is None else y + bias


def selective_scan(u: Array, delta: Array, A: Array, B: Array, C: Array, D: Optional[Array] = None, *,
                   initial_state: Optional[Array] = None, return_state: bool = False):
  """Mamba's selective scan (the sequential recurrence of HF ``MambaMixer.slow_forward``).

  For each time step ``t`` (``h`` starts at ``initial_state``, zeros by default)::

    h_t = exp(delta_t[:, None] * A) * h_{t-1} + (delta_t * u_t)[:, None] * B_t[None, :]
    y_t = h_t @ C_t + D * u_t

  computed in float32 with ``jax.lax.scan`` over time (memory ``O(batch * channels * state)`` per step).

  Args:
    u: ``(batch, seq, channels)`` input.
    delta: ``(batch, seq, channels)`` time steps (already ``softplus``-ed, positive).
    A: ``(channels, state)`` continuous-time state matrix (diagonal per channel; ``-exp(A_log)``).
    B: ``(batch, seq, state)`` input matrix.
    C: ``(batch, seq, state)`` output matrix.
    D: ``(channels,)`` skip connection, or None.
    initial_state: ``(batch, channels, state)`` or None.
    return_state: also return the final state.

  Returns:
    ``y (batch, seq, channels)`` float32, and with ``return_state`` the final
    ``h (batch, channels, state)`` float32.
  """
  f32 = jnp.float32
  u, delta, A, B, C = (jnp.asarray(a, f32) for a in (u, delta, A, B, C))
  batch, _, ch = u.shape
  h0 = (jnp.zeros((batch, ch, A.shape[-1]), f32) if initial_state is None
        else jnp.asarray(initial_state, f32))

  def step(h, xs):
    u_t, d_t, b_t, c_t = xs  # (batch, ch), (batch, ch), (batch, state), (batch, state)
    h = jnp.exp(d_t[..., None] * A) * h + (d_t * u_t)[..., None] * b_t[:, None, :]
    y_t = jnp.einsum("bcn,bn->bc", h, c_t, precision=jax.lax.Precision.HIGHEST)
    return h, y_t

  time_major = [jnp.swapaxes(a, 0, 1) for a in (u, delta, B, C)]
  h_last, y = jax.lax.scan(step, h0, time_major)
  y = jnp.swapaxes(y, 0, 1)
  if D is not None:
    y = y + u * jnp.asarray(D, f32)
  return (y, h_last) if return_state else y


def rms_norm(x: Array, weight: Array, eps: float) -> Array:
  """HF ``MambaRMSNorm``: ``weight * x / sqrt(mean(x**2, -1) + eps)``, statistics in float32.

  ``x (..., hidden)``, ``weight (hidden,)``; returns ``x``'s dtype promoted with ``weight``'s.
  """
  h = x.astype(jnp.float32)
  h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + eps)
  return weight * h.astype(x.dtype)


# --------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------


def _a_log_init(key, shape, dtype=jnp.float32):
  """S4D-real: ``A_log[c, n] = log(n + 1)``."""
  del key
  return jnp.broadcast_to(jnp.log(jnp.arange(1, shape[1] + 1, dtype=jnp.float32)), shape).astype(dtype)


class MambaRMSNorm(nn.Module):
  """RMSNorm with a ``weight (hidden,)`` param (HF ``MambaRMSNorm``)."""

  hidden_size: int
  eps: float = 1e-5
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    weight = self.param("weight", nn.initializers.ones, (self.hidden_size,), self.param_dtype)
    return rms_norm(x, weight, self.eps)


class CausalConv1d(nn.Module):
  """Depthwise causal conv with params ``kernel (K, 1, channels)`` and optional ``bias (channels,)``.

  The kernel is 3-D (``nn.Conv`` layout), so the default compression selection skips it.
  """

  channels: int
  kernel_size: int
  use_bias: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, u: Array, prev: Optional[Array] = None) -> Array:
    """``u (batch, seq, channels)``, ``prev (batch, K-1, channels)`` or None -> ``(batch, seq, channels)``."""
    fan_in = self.kernel_size  # torch's default init for a depthwise conv
    bound = 1.0 / math.sqrt(fan_in)
    init = nn.initializers.uniform(2 * bound)
    kernel = self.param("kernel", lambda k, s, d: init(k, s, d) - bound,
                        (self.kernel_size, 1, self.channels), self.param_dtype)
    bias = (self.param("bias", lambda k, s, d: init(k, s, d) - bound, (self.channels,), self.param_dtype)
            if self.use_bias else None)
    u, kernel, bias = nn.dtypes.promote_dtype(u, kernel, bias, dtype=self.dtype)
    return causal_depthwise_conv1d(u, kernel, bias, prev)


class MambaMixer(nn.Module):
  """HF ``MambaMixer`` (slow path): in_proj -> causal conv -> SiLU -> selective SSM -> gate -> out_proj."""

  config: MambaConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    c = self.config
    inter, rank = c.intermediate_size, c.dt_rank
    dense = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.in_proj = nn.Dense(2 * inter, use_bias=c.use_bias, **dense)
    self.conv1d = CausalConv1d(inter, c.conv_kernel, use_bias=c.use_conv_bias, **dense)
    self.x_proj = nn.Dense(rank + 2 * c.state_size, use_bias=False, **dense)
    dt_std = rank ** -0.5 * c.time_step_scale

    def dt_bias_init(key, shape, dtype=jnp.float32):  # inverse softplus of log-uniform dt (HF init)
      dt = jnp.exp(jax.random.uniform(key, shape) * (math.log(c.time_step_max) - math.log(c.time_step_min))
                   + math.log(c.time_step_min))
      dt = jnp.maximum(dt, c.time_step_floor)
      return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)

    self.dt_proj = nn.Dense(inter, use_bias=True, kernel_init=nn.initializers.uniform(2 * dt_std),
                            bias_init=dt_bias_init, **dense)
    self.A_log = self.param("A_log", _a_log_init, (inter, c.state_size), self.param_dtype)
    self.D = self.param("D", nn.initializers.ones, (inter,), self.param_dtype)
    self.out_proj = nn.Dense(c.hidden_size, use_bias=c.use_bias, **dense)

  def __call__(self, x: Array, conv_state: Optional[Array] = None, ssm_state: Optional[Array] = None):
    """One mixer over a chunk of tokens, continuing from a state.

    Args:
      x: ``(batch, seq, hidden)`` (normalised block input).
      conv_state: ``(batch, inter, K)`` last ``K`` conv inputs before ``x`` (None: sequence start).
      ssm_state: ``(batch, inter, state)`` float32 (None: zeros).

    Returns:
      ``(y (batch, seq, hidden), conv_state (batch, inter, K), ssm_state (batch, inter, state) float32)``.
    """
    c = self.config
    k_size = c.conv_kernel
    batch, seq, _ = x.shape
    inter, n, rank = c.intermediate_size, c.state_size, c.dt_rank
    xz = self.in_proj(x)  # (batch, seq, 2 * inter)
    u, z = xz[..., :inter], xz[..., inter:]
    if conv_state is None:
      conv_state = jnp.zeros((batch, inter, k_size), u.dtype)
    prev = jnp.swapaxes(conv_state, 1, 2)  # (batch, K, inter), oldest first
    window = jnp.concatenate([prev.astype(u.dtype), u], axis=1)
    new_conv_state = jnp.swapaxes(window[:, -k_size:, :], 1, 2)
    u = nn.silu(self.conv1d(u, prev[:, 1:, :]))  # (batch, seq, inter)
    ssm_params = self.x_proj(u)  # (batch, seq, rank + 2 n)
    dt, B, C = ssm_params[..., :rank], ssm_params[..., rank:rank + n], ssm_params[..., rank + n:]
    delta = jax.nn.softplus(self.dt_proj(dt).astype(jnp.float32))  # (batch, seq, inter)
    A = -jnp.exp(self.A_log.astype(jnp.float32))
    y, h = selective_scan(u, delta, A, B, C, self.D, initial_state=ssm_state, return_state=True)
    y = (y * nn.silu(z.astype(jnp.float32))).astype(self.dtype)
    return self.out_proj(y), new_conv_state, h


class MambaBlock(nn.Module):
  """HF ``MambaBlock``: ``x + mixer(norm(x))`` (residual in float32 when ``residual_in_fp32``)."""

  config: MambaConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    c = self.config
    self.norm = MambaRMSNorm(c.hidden_size, c.layer_norm_epsilon, self.param_dtype)
    self.mixer = MambaMixer(c, self.dtype, self.param_dtype)

  def __call__(self, x: Array, conv_state=None, ssm_state=None):
    """``x (batch, seq, hidden)`` -> ``(x', conv_state, ssm_state)`` (see :meth:`MambaMixer.__call__`)."""
    residual = x.astype(jnp.float32) if self.config.residual_in_fp32 else x
    y, conv_state, ssm_state = self.mixer(self.norm(x), conv_state, ssm_state)
    return residual + y, conv_state, ssm_state


class MambaLayers(nn.Module):
  """The block stack; its children are named ``"0"``, ``"1"``, ... (paths ``layers/<i>/...`` as in HF)."""

  config: MambaConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    self.blocks = [MambaBlock(self.config, self.dtype, self.param_dtype, name=str(i))
                   for i in range(self.config.num_hidden_layers)]

  def __call__(self, x: Array, cache: Optional[MambaCache] = None):
    """``x (batch, seq, hidden)``, cache or None -> ``(x', MambaCache)``."""
    convs, ssms = [], []
    for i, block in enumerate(self.blocks):
      x, cs, ss = block(x, None if cache is None else cache.conv_state[i],
                        None if cache is None else cache.ssm_state[i])
      convs.append(cs)
      ssms.append(ss)
    return x, MambaCache(jnp.stack(convs), jnp.stack(ssms))


class MambaLM(nn.Module):
  """HF ``MambaForCausalLM`` in Flax linen (params: see the module docstring).

  ``config`` is a :class:`MambaConfig` (an HF ``transformers.MambaConfig`` or a config dict is
  converted with :meth:`MambaConfig.from_any`). ``dtype`` is the compute dtype of the linears and the
  conv; norms' statistics, the selective scan and the logits are float32.

  Apply: ``model.apply({"params": params}, input_ids)`` -> logits ``(batch, seq, vocab)`` float32;
  with ``cache=`` it continues from a :class:`MambaCache`, with ``return_cache=True`` it also
  returns the cache after the last token. Helpers (plain functions of ``params``, jit-friendly, and
  runnable under :func:`softlm_jax.intercept` with compressed or exported trees):
  :meth:`init_cache`, :meth:`forward`, :meth:`prefill`, :meth:`decode_step`, :meth:`generate`.
  """

  config: Any
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.nowrap
  def cfg(self) -> MambaConfig:
    return MambaConfig.from_any(self.config)

  def setup(self):
    c = self.cfg()
    self.embeddings = nn.Embed(c.vocab_size, c.hidden_size, embedding_init=nn.initializers.normal(0.02),
                               param_dtype=self.param_dtype, dtype=self.dtype)
    self.layers = MambaLayers(c, self.dtype, self.param_dtype)
    self.norm_f = MambaRMSNorm(c.hidden_size, c.layer_norm_epsilon, self.param_dtype)
    if not c.tie_word_embeddings:
      self.lm_head = nn.Dense(c.vocab_size, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)

  def __call__(self, input_ids: Array, cache: Optional[MambaCache] = None, *, return_cache: bool = False):
    """Logits of every position.

    Args:
      input_ids: ``(batch, seq)`` int.
      cache: state after the previous tokens (None: ``input_ids`` start the sequence).
      return_cache: also return the :class:`MambaCache` after the last token.

    Returns:
      ``logits (batch, seq, vocab)`` float32 [, cache].
    """
    h = self.embeddings(input_ids)
    h, new_cache = self.layers(h, cache)
    h = self.norm_f(h)
    if self.cfg().tie_word_embeddings:
      logits = self.embeddings.attend(h.astype(self.dtype))
    else:
      logits = self.lm_head(h.astype(self.dtype))
    logits = logits.astype(jnp.float32)
    return (logits, new_cache) if return_cache else logits

  def step(self, token: Array, cache: MambaCache):
    """One decode step: ``token (batch,)`` int -> ``(logits (batch, vocab) float32, cache)``."""
    logits, cache = self(token[:, None], cache, return_cache=True)
    return logits[:, 0], cache

  # ---- functional helpers (no bound scope needed) ----

  @nn.nowrap
  def init_cache(self, batch: int, dtype: Any = None) -> MambaCache:
    """Zero state for ``batch`` sequences: conv ``(layers, batch, inter, K)`` in ``dtype`` (default the
    model's compute dtype), ssm ``(layers, batch, inter, state)`` float32."""
    c = self.cfg()
    n, inter = c.num_hidden_layers, c.intermediate_size
    return MambaCache(jnp.zeros((n, batch, inter, c.conv_kernel), dtype or self.dtype),
                      jnp.zeros((n, batch, inter, c.state_size), jnp.float32))

  @nn.nowrap
  def forward(self, params: Mapping, input_ids: Array) -> Array:
    """``logits (batch, seq, vocab)`` float32 of ``input_ids (batch, seq)``."""
    return self.apply({"params": params}, input_ids)

  @nn.nowrap
  def prefill(self, params: Mapping, input_ids: Array, cache: Optional[MambaCache] = None):
    """Parallel forward over a prompt: ``(logits (batch, seq, vocab), cache after the last token)``."""
    return self.apply({"params": params}, input_ids, cache, return_cache=True)

  @nn.nowrap
  def decode_step(self, params: Mapping, token: Array, cache: MambaCache):
    """``token (batch,)`` int, cache -> ``(logits (batch, vocab) float32, new cache)``; O(1) in the
    sequence length."""
    return self.apply({"params": params}, token, cache, method=MambaLM.step)

  @nn.nowrap
  def generate(self, params: Mapping, prompt_ids: Array, max_new_tokens: int) -> Array:
    """Greedy decoding: prefill the prompt in parallel, then ``lax.scan`` over decode steps.

    Args:
      params: dense, training-form (under ``softlm_jax.intercept(cfg)``) or exported tree.
      prompt_ids: ``(batch, prompt_len)`` int, ``prompt_len >= 1``.
      max_new_tokens: static int >= 0.

    Returns:
      ``(batch, prompt_len + max_new_tokens)`` int32: the prompt followed by the greedy tokens.
      Wrap in ``jax.jit`` (``max_new_tokens`` static) inside the ``intercept`` context if needed.
    """
    prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
    if prompt_ids.ndim != 2 or prompt_ids.shape[1] < 1:
      raise ValueError(f"prompt_ids must be (batch, prompt_len >= 1), got shape {prompt_ids.shape}")
    if max_new_tokens <= 0:
      return prompt_ids
    logits, cache = self.prefill(params, prompt_ids)
    first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)

    def body(carry, _):
      tok, cache = carry
      lg, cache = self.decode_step(params, tok, cache)
      nxt = jnp.argmax(lg, axis=-1).astype(jnp.int32)
      return (nxt, cache), nxt

    _, rest = jax.lax.scan(body, (first, cache), None, length=max_new_tokens - 1)
    return jnp.concatenate([prompt_ids, first[:, None], jnp.swapaxes(rest, 0, 1)], axis=1)


# --------------------------------------------------------------------------------------------------
# Loading HF weights
# --------------------------------------------------------------------------------------------------


def _to_numpy(v: Any) -> np.ndarray:
  """numpy view of a numpy array, jax array or torch tensor (torch is never imported here)."""
  if hasattr(v, "detach"):  # torch.Tensor
    v = v.detach().cpu()
    if str(v.dtype) == "torch.bfloat16":
      v = v.float()
    return v.numpy()
  return np.asarray(v)


def expected_hf_shapes(config: Any) -> dict[str, tuple]:
  """``{HF name: shape}`` of every tensor ``MambaForCausalLM`` has for ``config`` (``backbone.``
  prefix; ``lm_head.weight`` only when the embeddings are not tied)."""
  c = MambaConfig.from_any(config)
  h, inter, n, r, k = c.hidden_size, c.intermediate_size, c.state_size, c.dt_rank, c.conv_kernel
  out = {"backbone.embeddings.weight": (c.vocab_size, h)}
  for i in range(c.num_hidden_layers):
    p = f"backbone.layers.{i}."
    out[p + "norm.weight"] = (h,)
    out[p + "mixer.A_log"] = (inter, n)
    out[p + "mixer.D"] = (inter,)
    out[p + "mixer.conv1d.weight"] = (inter, 1, k)
    if c.use_conv_bias:
      out[p + "mixer.conv1d.bias"] = (inter,)
    out[p + "mixer.in_proj.weight"] = (2 * inter, h)
    if c.use_bias:
      out[p + "mixer.in_proj.bias"] = (2 * inter,)
      out[p + "mixer.out_proj.bias"] = (h,)
    out[p + "mixer.x_proj.weight"] = (r + 2 * n, inter)
    out[p + "mixer.dt_proj.weight"] = (inter, r)
    out[p + "mixer.dt_proj.bias"] = (inter,)
    out[p + "mixer.out_proj.weight"] = (h, inter)
  out["backbone.norm_f.weight"] = (h,)
  if not c.tie_word_embeddings:
    out["lm_head.weight"] = (c.vocab_size, h)
  return out


def _aliases(name: str) -> list[str]:
  """Spellings a tensor may have: with/without ``backbone.`` (a bare ``MambaModel``), and the
  original checkpoints' ``embedding.`` for ``embeddings.``."""
  names = [name]
  if name.startswith("backbone."):
    names.append(name[len("backbone."):])
  if "embeddings." in name:
    names += [n.replace("embeddings.", "embedding.") for n in list(names)]
  return names


def mamba_params_from_torch_state_dict(state_dict: Mapping[str, Any], config: Any, *,
                                       dtype: Any = np.float32, strict: bool = True) -> dict:
  """Flax params tree of :class:`MambaLM` from an HF ``MambaForCausalLM`` state dict.

  Args:
    state_dict: ``{name: tensor}`` with torch tensors or numpy/jax arrays (e.g. ``model.state_dict()``
      or a safetensors file read with the numpy API). Names as in HF (``backbone.layers.0.mixer.
      in_proj.weight``; a bare ``MambaModel``'s names without ``backbone.`` and the original
      ``backbone.embedding.weight`` are accepted too).
    config: :class:`MambaConfig`, HF ``MambaConfig`` or config dict; shapes are checked against it.
    dtype: dtype of the returned arrays.
    strict: raise on tensors that the model does not use (a tied ``lm_head.weight`` is always allowed).

  Layouts: torch ``Linear.weight (out, in)`` -> ``Dense kernel (in, out)``; ``conv1d.weight
  (inter, 1, K)`` -> ``kernel (K, 1, inter)``; embeddings, norms, ``A_log`` and ``D`` as they are.

  Returns:
    ``params`` for ``MambaLM(config).apply({"params": params}, ...)``.

  Raises:
    ValueError: naming the tensor, its shape and the expected shape for a missing or mis-shaped
      tensor, and listing unused tensors when ``strict``.
  """
  c = MambaConfig.from_any(config)
  shapes = expected_hf_shapes(c)
  used = set()

  def get(name: str) -> np.ndarray:
    want = shapes[name]
    for alias in _aliases(name):
      if alias in state_dict:
        arr = _to_numpy(state_dict[alias])
        if tuple(arr.shape) != want:
          raise ValueError(f"tensor '{alias}' has shape {tuple(arr.shape)}, expected {want} for "
                           f"{_describe(c)}")
        used.add(alias)
        return arr.astype(dtype)
    raise ValueError(f"missing tensor '{name}' (expected shape {want} for {_describe(c)}); "
                     f"the state dict has {len(state_dict)} tensors, e.g. {sorted(state_dict)[:4]}")

  def linear(prefix: str, bias: bool) -> dict:
    out = {"kernel": get(prefix + ".weight").T}
    if bias:
      out["bias"] = get(prefix + ".bias")
    return out

  layers = {}
  for i in range(c.num_hidden_layers):
    p = f"backbone.layers.{i}."
    conv = {"kernel": np.transpose(get(p + "mixer.conv1d.weight"), (2, 1, 0))}
    if c.use_conv_bias:
      conv["bias"] = get(p + "mixer.conv1d.bias")
    layers[str(i)] = {
        "norm": {"weight": get(p + "norm.weight")},
        "mixer": {
            "in_proj": linear(p + "mixer.in_proj", c.use_bias),
            "conv1d": conv,
            "x_proj": linear(p + "mixer.x_proj", False),
            "dt_proj": linear(p + "mixer.dt_proj", True),
            "A_log": get(p + "mixer.A_log"),
            "D": get(p + "mixer.D"),
            "out_proj": linear(p + "mixer.out_proj", c.use_bias),
        },
    }
  params = {"embeddings": {"embedding": get("backbone.embeddings.weight")}, "layers": layers,
            "norm_f": {"weight": get("backbone.norm_f.weight")}}
  if not c.tie_word_embeddings:
    params["lm_head"] = {"kernel": get("lm_head.weight").T}
  if strict:
    extra = sorted(k for k in state_dict if k not in used and k != "lm_head.weight")
    if extra:
      raise ValueError(f"{len(extra)} tensors are not used by MambaLM ({_describe(c)}): {extra[:8]}; "
                       "pass strict=False to ignore them")
  return jax.tree.map(jnp.asarray, params)


def _describe(c: MambaConfig) -> str:
  return (f"hidden_size={c.hidden_size}, intermediate_size={c.intermediate_size}, state_size="
          f"{c.state_size}, time_step_rank={c.dt_rank}, conv_kernel={c.conv_kernel}, vocab_size="
          f"{c.vocab_size}, num_hidden_layers={c.num_hidden_layers}")


def load_mamba_safetensors(path: str, *, dtype: Any = np.float32, strict: bool = True
                           ) -> tuple[MambaLM, dict]:
  """``(MambaLM, params)`` from an HF checkpoint folder (e.g. ``state-spaces/mamba-130m-hf``).

  Reads ``config.json`` and ``model.safetensors`` (or the shards listed in
  ``model.safetensors.index.json``) with the ``safetensors`` numpy API. ``path`` may also be the
  ``.safetensors`` file itself, with ``config.json`` next to it.
  """
  from safetensors.numpy import load_file  # heavy: imported on use

  folder, file = (os.path.dirname(path), path) if path.endswith(".safetensors") else (path, None)
  cfg_path = os.path.join(folder, "config.json")
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f"no config.json in {folder!r} (needed for the model shape)")
  with open(cfg_path) as f:
    config = MambaConfig.from_any(json.load(f))
  if file is None:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
      with open(index) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(folder, "model.safetensors")):
      files = ["model.safetensors"]
    else:
      raise FileNotFoundError(f"neither model.safetensors nor model.safetensors.index.json in {folder!r}")
    files = [os.path.join(folder, f) for f in files]
  else:
    files = [file]
  state_dict = {}
  for f in files:
    state_dict.update(load_file(f))
  return MambaLM(config), mamba_params_from_torch_state_dict(state_dict, config, dtype=dtype, strict=strict)


# --------------------------------------------------------------------------------------------------
# The family
# --------------------------------------------------------------------------------------------------


class MambaFamily(family.Family):
  """:class:`MambaLM`: an HF Mamba checkpoint folder (``config.json`` with ``model_type: mamba`` and
  safetensors) or, as ``tiny-mamba``, a random 4-block model over a real tokenizer (smoke runs).
  Only the mixers' ``in_proj`` / ``out_proj`` are compressed (``x_proj`` / ``dt_proj`` are tiny)."""
  kind = "causal_lm"
  include = r"layers/\d+/mixer/(in_proj|out_proj)"

  def __init__(self, name: str, tiny: bool):
    self.name, self.tiny = name, tiny
    self.description = "random 4-block Mamba (smoke runs)" if tiny else "a HF Mamba folder (config.json + safetensors)"

  def accepts(self, spec: str) -> bool:
    if self.tiny or not spec or not os.path.isdir(spec):
      return False
    try:
      with open(os.path.join(spec, "config.json")) as f:
        return json.load(f).get("model_type") == "mamba"
    except (OSError, ValueError):
      return False

  def load(self, spec, *, max_len=512, seed=0, num_labels=None):
    if self.tiny:
      tok, source = hf.tiny_tokenizer()
      module = MambaLM(MambaConfig(vocab_size=len(tok), hidden_size=128, state_size=8, num_hidden_layers=4))
      params = module.init(jax.random.PRNGKey(seed), jnp.zeros((1, 8), jnp.int32))["params"]
      return family.Model(self, spec, module, params, tok, source)
    module, params = load_mamba_safetensors(spec)
    from transformers import AutoTokenizer  # heavy: imported on use
    return family.Model(self, spec, module, params, AutoTokenizer.from_pretrained(spec), spec)

  def logits(self, module, params, inputs, *, train=False, rng=None):
    return module.apply({"params": params}, inputs)

  def hidden(self, module, params, inputs):
    raise ValueError(f"{self.name}: hidden-state distillation is not implemented for the Mamba port "
                     "(it returns no per-block states); use distill_hidden=0")

  def generate(self, module, params, ids, *, max_new_tokens, cfg=None, attention_mask=None):
    if attention_mask is not None and not bool(jnp.all(jnp.asarray(attention_mask) > 0)):
      raise ValueError("Mamba generation takes prompts of one length (no padding): give one prompt, or ids")

    @functools.partial(jax.jit, static_argnums=2)
    def run(p, x, n):
      with intercept(cfg):
        return module.generate(p, x, n)
    return run(params, jnp.asarray(ids, jnp.int32), int(max_new_tokens))

  def model_class(self, module) -> str:
    return f"{MambaLM.__module__}.{MambaLM.__qualname__}"

  def model_config(self, module) -> dict:
    return {"model_type": "mamba", **dataclasses.asdict(MambaConfig.from_any(module.config))}

  def from_manifest(self, info, *, seed=0, init=False, dtype=None):
    conf = {k: v for k, v in dict(info["model_config"]).items() if k != "model_type"}
    return MambaLM(MambaConfig(**conf), **({} if dtype is None else {"dtype": dtype}))


family.register(MambaFamily("mamba", tiny=False))
family.register(MambaFamily("tiny-mamba", tiny=True))
