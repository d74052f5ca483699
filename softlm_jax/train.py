"""A jitted trainer with the paper's two phases, orbax checkpoints that resume, and a progress bar.

Phase 1 (compress): ``L_task + gamma * L_cmp`` until the counted params reach the budget, at which
point :func:`softlm_jax.budget_freeze` (inside the jitted step) stops the thresholds.
Phase 2 (fine-tune): ``finetune_steps`` more steps with thresholds frozen. Trees without thresholds
(dense fine-tuning, the static-SVD baseline) simply run ``steps`` steps with the same step function.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from softlm_jax import budget, distributed, files, losses, shard, tree
from softlm_jax.config import CompressionConfig
from softlm_jax.intercept import intercept
from softlm_jax.interrupt import StopRequest
from softlm_jax.optim import budget_state


class TrainState(NamedTuple):
  """step: int32 (); params, opt_state: pytrees; rng: uint32 (2,) raw PRNG key (checkpointable)."""
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


def init_state(params, tx: optax.GradientTransformation, seed: int = 0, mesh=None) -> TrainState:
  """Fresh state. Copies ``params``: the train step donates its state, and trees from
  compress/static_svd share untouched leaves (embeddings, biases) with the caller's tree.

  With ``mesh`` (:func:`softlm_jax.make_mesh`) the params are placed first, so the optimizer state is
  created already split (:func:`softlm_jax.shard.fsdp_spec`), never whole on one device.
  """
  if mesh is not None:
    params = shard.shard_tree(params, mesh)
  params = jax.tree.map(jnp.array, params)
  state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), jax.random.PRNGKey(seed))
  return shard.shard_state(state, mesh) if mesh is not None else state


def make_train_step(task_loss: Callable, tx: optax.GradientTransformation,
                    cfg: Optional[CompressionConfig] = None, mesh=None) -> Callable:
  """Returns ``train_step(state, batch) -> (state, metrics)``, jitted, the state donated.

  Args:
    task_loss: ``(params, batch, rng) -> scalar`` run under :func:`softlm_jax.intercept`.
    tx: e.g. :func:`softlm_jax.make_optimizer`.
    cfg: the compression config (adds ``gamma * L_cmp``); None for dense fine-tuning.
    mesh: a ``("data", "fsdp")`` mesh (:func:`softlm_jax.make_mesh`), None for one device. The step
      then takes the state placed by :func:`softlm_jax.shard.state_shardings` (placing it if it is
      not) and the batch split on ``"data"`` (:func:`softlm_jax.shard.shard_batch`; a leading axis the
      data axis does not divide raises a ValueError naming the sizes); the new state is constrained to
      the same shardings. Counting, the freeze and the losses see the global arrays.
  """
  def step(state: TrainState, batch):
    rng, sub = jax.random.split(state.rng)

    def total(p):
      with intercept(cfg):
        task = task_loss(p, batch, sub)
      cmp = losses.compression_loss(p, cfg, state.step) if cfg is not None else jnp.zeros(())
      return task + cmp, (task, cmp)

    (loss, (task, cmp)), grads = jax.value_and_grad(total, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "task_loss": task, "cmp_loss": cmp, "params": budget.count_params(params)}
    bs = budget_state(opt_state)
    if bs is not None:
      metrics.update(frozen=bs.frozen, freeze_step=bs.freeze_step)
    new = TrainState(state.step + 1, params, opt_state, rng)
    if mesh is not None:
      new = jax.lax.with_sharding_constraint(new, shard.state_shardings(new, mesh))
    return new, metrics

  jitted = jax.jit(step, donate_argnums=(0,))
  if mesh is None:
    return jitted

  def sharded_step(state: TrainState, batch):
    return jitted(shard.shard_state(state, mesh), shard.shard_batch(batch, mesh))

  return sharded_step


def _manager(ckpt_dir: str, max_to_keep: int = 2):
  import orbax.checkpoint as ocp  # heavy: imported on use
  return ocp.CheckpointManager(os.path.abspath(ckpt_dir),
                               options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))


def save_checkpoint(ckpt_dir: str, state: TrainState, manager=None) -> None:
  import orbax.checkpoint as ocp  # heavy: imported on use
  mgr = manager or _manager(ckpt_dir)
  mgr.save(int(state.step), args=ocp.args.StandardSave(state._asdict()), force=True)
  files.fault_point("checkpoint_write")  # orbax writes to a temporary folder, renamed when finished
  mgr.wait_until_finished()


def restore_checkpoint(ckpt_dir: str, like: TrainState, manager=None, mesh=None) -> Optional[TrainState]:
  """Latest checkpoint in ``ckpt_dir`` restored into the structure of ``like``; None if none.

  With ``mesh`` every leaf is read straight into its :func:`softlm_jax.shard.state_shardings` place
  on that mesh, whatever mesh shape saved it (orbax reads each device's slice); without, into the
  shardings of ``like``'s leaves.
  """
  import orbax.checkpoint as ocp  # heavy: imported on use
  mgr = manager or _manager(ckpt_dir)
  step = mgr.latest_step()
  if step is None:
    return None
  if mesh is not None:
    shardings = shard.state_shardings(like, mesh)._asdict()
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                            like._asdict(), shardings)
  else:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like._asdict())
  return TrainState(**mgr.restore(step, args=ocp.args.StandardRestore(abstract)))


def resume_history(path: str, step: int) -> list[dict]:
  """The logged rows of ``history.jsonl`` up to ``step`` (the checkpoint a run resumes from), one per
  step, and the file rewritten to hold just those (:func:`softlm_jax.files.atomic_write`). Rows past
  the checkpoint (logged by a run killed before its next save) and a last line cut short by the kill
  are dropped, so a resumed run logs each step once."""
  rows: dict[int, dict] = {}
  with open(path) as f:
    for line in f:
      try:
        r = json.loads(line)
      except json.JSONDecodeError:  # the line being appended when the process died
        continue
      if r["step"] <= step:
        rows.setdefault(r["step"], r)
  history = [rows[k] for k in sorted(rows)]
  files.atomic_write(path, "".join(json.dumps(r) + "\n" for r in history).encode())
  return history


def has_thresholds(params) -> bool:
  """Whether ``params`` has learnable selections (SoftLM thresholds or LLRC masks)."""
  return any(budget.has_selection(layer) for _, layer in tree.factored_layers(params))


def fit(state: TrainState, train_step: Callable, batch_fn: Callable[[int], Any], *,
        steps: Optional[int] = None, finetune_steps: int = 0, max_compress_steps: int = 1000,
        ckpt_dir: Optional[str] = None, save_every: int = 100, progress: bool = True,
        log_every: int = 10, stop_after: Optional[int] = None,
        target: Optional[int] = None, eval_fn: Optional[Callable[[Any], dict]] = None,
        eval_every: int = 0, mesh=None) -> tuple[TrainState, list[dict]]:
  """Runs the training loop; resumes from ``ckpt_dir`` when it holds a checkpoint.

  With thresholds in the tree the run ends ``finetune_steps`` after the budget froze them (or
  ``max_compress_steps + finetune_steps`` if it never does); without, after ``steps``.
  ``batch_fn(step)`` must be a pure function of the step (resume reproduces the same batches).
  ``stop_after`` simulates an interruption (tests); ``target`` is shown next to the param count in
  the progress bar. ``eval_fn(params) -> {name: float}`` (outside jit; e.g. a held-out perplexity)
  runs every ``eval_every`` steps, at step 0 and at the end; its values join that step's logged row.
  ``mesh``: the state (fresh or restored from ``ckpt_dir``, whatever mesh saved it) is placed on it
  (:func:`softlm_jax.shard.shard_state`); pass a ``train_step`` made with the same mesh. Returns the
  final state and the logged metrics.
  """
  compress = has_thresholds(state.params)
  if not compress and steps is None:
    raise ValueError("steps is required for trees without thresholds")
  mgr = _manager(ckpt_dir) if ckpt_dir else None
  history: list[dict] = []
  log_path = os.path.join(ckpt_dir, "history.jsonl") if ckpt_dir else None
  if mesh is not None:
    state = shard.shard_state(state, mesh)
  if mgr is not None:
    restored = restore_checkpoint(ckpt_dir, state, mgr, mesh=mesh)
    if restored is not None:
      state = restored
      if log_path and os.path.exists(log_path):
        history = resume_history(log_path, int(state.step))

  def end_step(state: TrainState) -> int:
    if not compress:
      return steps
    bs = budget_state(state.opt_state)
    if bs is not None and bool(bs.frozen):
      return int(bs.freeze_step) + finetune_steps
    return max_compress_steps + finetune_steps

  step, end = int(state.step), end_step(state)
  bar = None
  if progress:
    bar = tqdm(total=end, initial=step, dynamic_ncols=True, mininterval=2.0)
  start = time.time()

  def log(row):
    history.append(row)
    if log_path and distributed.is_main():  # several processes: one writer
      with open(log_path, "a") as f:
        f.write(json.dumps(row) + "\n")

  def evaluate(params) -> dict:
    return {k: float(v) for k, v in eval_fn(params).items()}

  if eval_fn is not None and eval_every > 0 and step == 0:
    log({"step": 0, **evaluate(state.params), "time": 0.0})
  ctrl_c = StopRequest().install()  # Ctrl-C stops at a step boundary, saves, says where it resumes
  while step < end:
    if (stop_after is not None and step >= stop_after) or ctrl_c.requested:
      break
    state, metrics = train_step(state, batch_fn(step))
    files.fault_point("train_step")
    step, end = step + 1, end_step(state)  # the end moves once the budget freezes the thresholds
    do_eval = eval_fn is not None and eval_every > 0 and (step % eval_every == 0 or step == end)
    if step % log_every == 0 or step == end or do_eval:
      row = {"step": step, **{k: float(v) for k, v in jax.device_get(metrics).items()},
             "time": time.time() - start}
      if do_eval:
        row.update(evaluate(state.params))
      log(row)
      if bar is not None:
        phase = "finetune" if row.get("frozen") else ("compress" if compress else "train")
        count = f"{int(row['params'])}" + (f"/{target}" if target is not None else "")
        bar.set_postfix(phase=phase, loss=f"{row['loss']:.4f}", params=count, refresh=False)
    if bar is not None:
      bar.total = end
      bar.update(1)
    if mgr is not None and (step % save_every == 0 or step == end):
      save_checkpoint(ckpt_dir, state, mgr)
  ctrl_c.uninstall()
  if bar is not None:
    bar.close()
  if ctrl_c.requested:
    _stopped(ckpt_dir, state, mgr, step)
  return state, history


def _stopped(ckpt_dir: Optional[str], state: TrainState, mgr, step: int) -> None:
  """After a Ctrl-C: saves ``state`` (unless step ``step`` is saved already), prints where a rerun
  resumes and raises KeyboardInterrupt with that line."""
  if mgr is None:
    msg = f"interrupted at step {step}; no checkpoint folder, nothing saved"
  else:
    if mgr.latest_step() != step:
      save_checkpoint(ckpt_dir, state, mgr)
    msg = f"interrupted at step {step}; checkpoint in {ckpt_dir}: rerun the same command to resume from step {step}"
  print(f"[interrupt] {msg}", flush=True)
  raise KeyboardInterrupt(msg)


def distill_task(logits_fn: Callable, *, base_loss: Optional[Callable] = None, weight: float = 1.0,
                 temperature: float = 1.0, hidden_fn: Optional[Callable] = None,
                 hidden_weight: float = 0.0) -> Callable:
  """``task_loss`` with a frozen dense teacher: knowledge distillation.

  ``logits_fn(params, inputs) -> (..., vocab)`` logits. The returned ``task_loss(p, batch, rng)`` reads
  the inputs from ``batch["inputs"]`` and the teacher's dense tree from ``batch["teacher"]`` (passed
  *in the batch*: a tree closed over would be baked into the jitted step as constants), and returns

  * without ``base_loss`` (frozen-weight selection: LLRC, SoftLM thresholds alone):
    ``weight * T^2 * KL(teacher_T || student_T)`` (:func:`softlm_jax.distillation_loss`);
  * with ``base_loss(student_logits, batch) -> scalar`` (fine-tuning, e.g. next-token
    cross-entropy): ``base_loss + weight * T^2 * KL``, Hinton et al.'s soft targets beside the task.

  ``T = temperature`` softens both distributions. The teacher's logits carry no gradient.
  With ``hidden_weight > 0``, ``hidden_fn(params, inputs) -> (logits, hidden states)``
  (:meth:`softlm_jax.models.Model.hidden_fn`) replaces ``logits_fn`` and
  ``hidden_weight * hidden_distillation_loss`` (every block's output matched token by token,
  :func:`softlm_jax.losses.hidden_distillation_loss`) is added.
  """
  if not (weight >= 0 and temperature > 0 and hidden_weight >= 0):
    raise ValueError(f"need weight >= 0, temperature > 0 and hidden_weight >= 0, got {weight!r}, "
                     f"{temperature!r}, {hidden_weight!r}")
  if hidden_weight > 0 and hidden_fn is None:
    raise ValueError("hidden_weight > 0 needs hidden_fn (the model's (logits, hidden states))")

  def task(p, batch, rng):
    del rng
    if hidden_weight > 0:
      student, s_hidden = hidden_fn(p, batch["inputs"])
      teacher, t_hidden = hidden_fn(batch["teacher"], batch["inputs"])
      extra = hidden_weight * losses.hidden_distillation_loss(s_hidden, t_hidden)
    else:
      student = logits_fn(p, batch["inputs"])
      teacher = logits_fn(batch["teacher"], batch["inputs"])  # distillation_loss stops its gradient
      extra = 0.0
    kd = weight * losses.distillation_loss(student, teacher, temperature=temperature) + extra
    return kd if base_loss is None else base_loss(student, batch) + kd
  return task
