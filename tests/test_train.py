"""Trainer: orbax round trip is exact, an interrupted run resumes to the same params, the two phases."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

import softlm_jax as sl
from softlm_jax import train
from tests.conftest import VOCAB, build

CFG = sl.CompressionConfig(target_ratio=0.3, alpha_lr=0.05, gamma=1.0, sharpness=200.0)


def setup():
  model = build("bert")
  data = np.random.RandomState(0).randint(0, VOCAB, (64, 12)).astype(np.int32)
  labels = (data[:, 0] % 2).astype(np.int32)

  def task_loss(p, batch, rng):
    logits = model(batch["ids"], params=p, dropout_rng=rng, train=True).logits
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()

  def batch_fn(step):
    idx = sl.data.batch_indices(64, 8, step, seed=0)
    return {"ids": jnp.asarray(data[idx]), "labels": jnp.asarray(labels[idx])}

  params = sl.compress_params(model.params, CFG)
  tx = sl.make_optimizer(CFG, optax.adam(1e-3))
  return params, tx, train.make_train_step(task_loss, tx, CFG), batch_fn


def leaves_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def test_checkpoint_round_trip_is_exact(tmp_path):
  params, tx, step_fn, batch_fn = setup()
  state = train.init_state(params, tx)
  state, _ = step_fn(state, batch_fn(0))
  train.save_checkpoint(str(tmp_path), state)
  like = train.init_state(params, tx, seed=5)
  restored = train.restore_checkpoint(str(tmp_path), like)
  assert int(restored.step) == 1
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  assert leaves_equal(restored, state)


def test_two_phases_and_resume_gives_same_params(tmp_path):
  params, tx, step_fn, batch_fn = setup()
  kw = dict(finetune_steps=6, max_compress_steps=60, progress=False, log_every=1, save_every=4)
  full, hist = train.fit(train.init_state(params, tx), step_fn, batch_fn, ckpt_dir=str(tmp_path / "a"), **kw)
  bs = sl.budget_state(full.opt_state)
  assert bool(bs.frozen), "the budget is reached within max_compress_steps"
  assert int(full.step) == int(bs.freeze_step) + 6
  assert int(sl.count_params(full.params)) <= sl.target_params(full.params, CFG)
  # thresholds did not move during the fine-tuning phase
  frozen_rows = [h for h in hist if h["frozen"]]
  assert len(frozen_rows) >= 6 and len({h["params"] for h in frozen_rows}) >= 1
  # interrupted mid-way (after a checkpoint at step 8), then resumed from disk
  cut, _ = train.fit(train.init_state(params, tx), step_fn, batch_fn, ckpt_dir=str(tmp_path / "b"),
                     stop_after=10, **kw)
  assert int(cut.step) == 10
  resumed, _ = train.fit(train.init_state(params, tx), step_fn, batch_fn, ckpt_dir=str(tmp_path / "b"), **kw)
  assert int(resumed.step) == int(full.step)
  assert leaves_equal(resumed.params, full.params)


def test_dense_training_runs_fixed_steps():
  model = build("bert")
  data = np.random.RandomState(1).randint(0, VOCAB, (16, 12)).astype(np.int32)

  def task_loss(p, batch, rng):
    return jnp.mean(model(batch, params=p, train=False).logits ** 2)

  tx = optax.adam(1e-3)
  step_fn = train.make_train_step(task_loss, tx)
  state = train.init_state(model.params, tx)
  before = float(task_loss(state.params, jnp.asarray(data), None))
  state, hist = train.fit(state, step_fn, lambda s: jnp.asarray(data), steps=5, progress=False, log_every=1)
  assert int(state.step) == 5 and hist[-1]["task_loss"] < before
