"""The public entry points for parameter trees (Linen, HF Flax) and Flax NNX modules alike.

``compress_params``, ``export_params`` and ``count_params`` take either a parameter tree (the core's
functions, unchanged) or an ``nnx.Module``: the module is adapted to the canonical tree
(:class:`softlm_jax.nnx_bridge.NNXModel`), the same core function runs on that tree, and the result is
handed back as a new ``nnx.Module`` whose compressed projections are :class:`~softlm_jax.nnx_bridge.LinearMap`
layers (ordinary NNX modules: call them as they are, train them with ``nnx.Optimizer``, wrap them in
``nnx.LoRA``). :func:`load_module` rebuilds such a module from a compact checkpoint.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any, Optional, Union

from flax import nnx

from softlm_jax import budget, checkpoint, compress, export, models
from softlm_jax.calib import Calibration
from softlm_jax.config import CompressionConfig
from softlm_jax.nnx_bridge import NNXModel

Tree = Union[Mapping, nnx.Module]


def _calibration(handle: NNXModel, calibration: Any) -> Optional[Calibration]:
  if calibration is None or isinstance(calibration, Calibration):
    return calibration
  if isinstance(calibration, Iterable):
    return Calibration(handle.apply, list(calibration))
  raise TypeError(f"calibration must be a Calibration or an iterable of model inputs, got {type(calibration).__name__}")


def compress_params(params: Tree, cfg: CompressionConfig, grams: Optional[Mapping] = None, *,
                    factors: Optional[Mapping[str, tuple]] = None, calibration: Any = None) -> Tree:
  """:func:`softlm_jax.compress.compress_params` of a tree, or of an ``nnx.Module``.

  For a module, ``calibration`` may also be an iterable of model inputs (a whitened or propagated
  decomposition runs the module on them); the result is a new module in training form (factors, ``s``
  and the rule's parameters as ``nnx.Param``) that computes with ``cfg``'s threshold when called.
  """
  if not isinstance(params, nnx.Module):
    return compress.compress_params(params, cfg, grams, factors=factors, calibration=calibration)
  handle = NNXModel(params, cfg=cfg)
  tree = compress.compress_params(handle.params, cfg, grams, factors=factors,
                                  calibration=_calibration(handle, calibration))
  return handle.module_for(tree, cfg)


def export_params(params: Tree, cfg: Optional[CompressionConfig] = None, **kw) -> Tree:
  """:func:`softlm_jax.export.export_params` of a tree, or of an ``nnx.Module`` in training form (the
  compact module: each layer cut to its rank, or dense below break-even)."""
  if not isinstance(params, nnx.Module):
    return export.export_params(params, cfg, **kw)
  handle = NNXModel(params)
  return handle.module_for(export.export_params(handle.params, cfg, **kw))


def count_params(params: Tree, cfg: Optional[CompressionConfig] = None):
  """:func:`softlm_jax.budget.count_params` of a tree or of an ``nnx.Module``'s canonical tree."""
  if isinstance(params, nnx.Module):
    params = NNXModel(params).params
  return budget.count_params(params, cfg)


def save_module(path: Union[str, os.PathLike], module: nnx.Module, *, cfg: Optional[CompressionConfig] = None,
                family: Optional[str] = None, metadata: Optional[Mapping] = None) -> None:
  """:func:`softlm_jax.save_compact` of an exported ``nnx.Module``; ``family`` (a registered NNX family
  name, e.g. ``"smollm2-nnx"``) records how :func:`load_module` rebuilds it."""
  handle = NNXModel(module)
  meta = dict(metadata or {})
  model_config = None
  if family is not None:
    fam = models.get(family)
    meta.update({"family": fam.name, "model_class": fam.model_class(handle)})
    model_config = fam.model_config(handle)
  checkpoint.save_compact(path, handle.params, cfg=cfg, model_config=model_config, metadata=meta)


def load_module(path: Union[str, os.PathLike], like: Optional[nnx.Module] = None, *, verify: bool = True) -> nnx.Module:
  """The ``nnx.Module`` of a compact checkpoint: its factored projections are
  :class:`~softlm_jax.nnx_bridge.LinearMap` modules holding ``left`` / ``right``, dense ones ``kernel``.

  ``like``: the dense model the file was compressed from, or its abstract twin
  (``nnx.eval_shape(lambda: MyModel(...))``), for a model of your own; without it the file must come
  from a registered NNX family (``softlm compress --model smollm2-nnx``, or :func:`save_module` with
  ``family=``).
  """
  params, info = checkpoint.load_compact(path, verify=verify)
  handle = (NNXModel(like) if like is not None
            else models.family.family_of_manifest(info).from_manifest(info))
  if not isinstance(handle, NNXModel):
    raise ValueError(f"{os.fspath(path)} was written from {info.get('metadata', {}).get('family')!r}, not an NNX "
                     "model family; load it with softlm_jax.load_compact")
  return handle.module_for(params, checkpoint.config_from_manifest(info))
