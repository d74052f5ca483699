"""The training-free recipe through the pipeline: ``allocated`` methods (a global
loss-aware allocation, factors fit again at the allocated ranks by a rank-dependent decomposition) and
the block refit as a pipeline stage, on a tiny random Llama with WikiText-2 windows. Whole runs (slow):
``scripts/test.sh --all``."""
import json

import numpy as np
import pytest

import softlm_jax as sl
from softlm_jax import allocate, budget, data, propagate, refit, run, tasks, tree
from softlm_jax.blocks import get_subtree
from softlm_jax.intercept import intercept

needs_wikitext = pytest.mark.skipif(data.find_data_dir() is None, reason="needs ../shared/data (WikiText-2)")
#: each test below runs the pipeline (scripts/test.sh --all)
slow = pytest.mark.slow

SMALL = ["--task", "wikitext", "--model", "tiny-llama", "--seq-len", "32", "--calib-len", "32", "--eval-len", "64",
         "--eval-windows", "2", "--calib-grams", "8", "--batch-size", "4", "--no-progress"]


def _ranks(tree_: dict) -> dict:
  return {p: int(np.shape(lay["left"])[1]) for p, lay in tree.factored_layers(tree_)}


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
  """``softlm compress`` at CR 0.5 with the ``lm`` preset's decomposition (propagated), run once for the
  module: (its folder, its summary, the ranks each call of the propagated fit was given)."""
  from softlm_jax import cli
  calls = []
  real = propagate.propagated_factors
  out = tmp_path_factory.mktemp("compress")
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(propagate, "propagated_factors", lambda *a, **k: calls.append(k.get("ranks")) or real(*a, **k))
    summary = cli.run(["compress", *SMALL, "--decomposition", "propagated", "--cr", "0.5", "--out", str(out)])
  return out, summary, calls


@slow
@needs_wikitext
def test_softlm_compress_writes_the_allocated_model_at_refit_ranks(compressed):
  """``softlm compress`` with no method writes ``allocated``: the exact budget fill of the Fisher
  allocation (scored on the whitened triplets), the propagated factors fit at exactly those ranks."""
  out, summary, calls = compressed
  assert summary["method"] == "allocated"
  params, info = sl.load_compact(out / "allocated" / "compact.safetensors")
  got = _ranks(params)
  # the allocation scores the whitened triplets (full rank = dense); the propagated fit runs once, at its ranks
  assert len(calls) == 1
  full = {p: r for p, r in calls[0].items() if p not in got}  # at or above break-even: kept dense
  assert calls[0] == {**got, **full}, (calls[0], got)
  for p in full:
    assert full[p] == min(np.shape(get_subtree(params, p)["kernel"]))
  assert len(set(got.values())) > 1  # not the uniform keep-ratio
  counted, target = summary["counted_params"], summary["target_params"]
  assert counted <= target
  shapes = {p: (*budget.layer_shape(lay), min(budget.layer_shape(lay))) for p, lay in tree.factored_layers(params)}
  nxt = allocate.next_step_costs(shapes, got)
  assert target - counted < min(nxt.values())  # exact: no layer's next triplet fits the slack
  man = json.loads((out / "allocated" / "compress.json").read_text())
  assert man["counted_params"] == counted


@slow
@needs_wikitext
def test_block_refit_runs_as_a_stage_and_keeps_the_ranks(tmp_path):
  """``TrainConfig.refit_steps`` (and ``--refit-holdout``): ``allocated-refit``'s exported model is refit
  block by block (the same as calling ``refit.refit_blocks`` on it), and no rank changes."""
  from softlm_jax.cli import options
  from softlm_jax import cli
  o = options.parse(cli.build_parser(), ["train", *SMALL, "--decomposition", "whitened", "--out", str(tmp_path),
                                         "--methods", "allocated-refit", "--cr", "0.5", "--refit-steps", "12",
                                         "--refit-lr", "3e-3", "--refit-holdout", "1"]).options
  model, task = run.load(o.model, o.data)
  comp = run.Comparison(model, task, o.compression, o.train, str(tmp_path))
  method = run.parse_method("allocated-refit")
  before, cfg = comp.initial(method, 0.5)
  res = comp.run_method("allocated-refit", 0.5)
  after, _ = sl.load_compact(tmp_path / "allocated-refit" / "compact.safetensors")
  assert _ranks(after) == _ranks(before)
  assert res["budget"]["counted_params"] == int(sl.count_params(before, cfg))
  blocks = res["refit"]["blocks"]
  assert len(blocks) == 4 and res["train_steps"] == 0 and res["refit"]["holdout"] == 1
  assert all(isinstance(b["kept"], bool) and b["heldout_before"] > 0 for b in blocks)
  # the stage is refit.refit_blocks on the exported model, from the dense model, on the run's calibration set
  ref = refit.refit_blocks(comp.dense, before, comp.calibration, refit.RefitConfig(steps=12, lr=3e-3, holdout=1),
                           progress=False)
  guard = res["guard"]["steps"]
  assert [g["step"] for g in guard] == ["refit"]
  if not guard[0]["kept"]:  # the model-level guard reverted the refit: the saved model is the decomposition
    assert guard[0]["loss_after"] > guard[0]["loss_before"]
    ref = before
  for p, lay in tree.factored_layers(after):
    want = get_subtree(ref, p)
    for k in ("left", "right"):
      np.testing.assert_allclose(np.asarray(lay[k]), np.asarray(want[k]), rtol=1e-5, atol=1e-6, err_msg=p)
  # the saved model is what was evaluated
  ppl = tasks.perplexity(model, after, None, task.windows["test"])
  assert ppl == pytest.approx(res["metrics"]["test"]["ppl"], rel=1e-5)


@slow
@needs_wikitext
def test_train_starts_from_a_compress_file_and_refuses_a_mismatched_one(tmp_path):
  """``--start-file``: ``softlm train``'s allocated run starts from ``softlm compress``'s file, leaf for
  leaf (no decomposition); a file of another CR or method, or a learned rule, is refused by name."""
  from softlm_jax import cli
  from softlm_jax.cli import options
  import jax
  cli.run(["compress", *SMALL, "--decomposition", "whitened", "--cr", "0.5", "--out", str(tmp_path / "c")])
  f = str(tmp_path / "c" / "allocated" / "compact.safetensors")
  want, _ = sl.load_compact(f)
  argv = ["train", *SMALL, "--decomposition", "whitened", "--out", str(tmp_path / "t"), "--cr", "0.5",
          "--start-file", f, "--refit-steps", "0", "--steps", "2", "--lr", "1e-3"]
  o = options.parse(cli.build_parser(), [*argv, "--methods", "allocated"]).options
  assert o.train.start_file == f
  model, task = run.load(o.model, o.data)
  comp = run.Comparison(model, task, o.compression, o.train, str(tmp_path / "t"), log=lambda s: None)
  start, cfg = comp.initial(run.parse_method("allocated"), 0.5)
  assert comp.grams_collected == 0  # nothing decomposed
  assert jax.tree.structure(start) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  res = comp.run_method("allocated", 0.5)
  assert res["train_steps"] == 2 and _ranks(sl.load_compact(tmp_path / "t" / "allocated" / "compact.safetensors")[0]) \
      == _ranks(want)
  with pytest.raises(ValueError, match="CR 0.5.*0.4"):
    run.check_start_file(f, "allocated", 0.4)
  with pytest.raises(ValueError, match="method 'allocated'.*'static'"):
    run.check_start_file(f, "static", 0.5)
  with pytest.raises(ValueError, match="only static / allocated"):
    run.check_start_file(f, "softlm", 0.5)
  with pytest.raises(ValueError, match="source model"):
    run.check_start_file(f, "allocated", 0.5, "another-model")
  with pytest.raises(ValueError, match="CR 0.5.*0.3"):  # refused before anything trains
    run.run_comparison(model, task, o.compression, o.train, ["allocated"], [0.3], str(tmp_path / "u"),
                       log=lambda s: None)


@slow
@needs_wikitext
def test_softlm_thresholds_start_at_a_lower_cr_allocation(tmp_path):
  """``--start-allocation``: SoftLM's thresholds start where each layer keeps exactly the ranks of the
  global allocation at that CR, then the rule learns its way down to the target (freeze after step 0)."""
  from softlm_jax import cli
  from softlm_jax.cli import options
  argv = ["train", *SMALL, "--preset", "lm-softlm", "--out", str(tmp_path), "--methods", "softlm", "--cr", "0.5",
          "--start-allocation", "0.3", "--compress-steps", "0", "--alpha-lr", "0.1", "--finetune-steps", "1",
          "--max-compress-steps", "200"]
  o = options.parse(cli.build_parser(), argv).options
  model, task = run.load(o.model, o.data)
  comp = run.Comparison(model, task, o.compression, o.train, str(tmp_path), log=lambda s: None)
  start, cfg = comp.initial(run.parse_method("softlm"), 0.5)
  key, base = comp.base(run.parse_method("softlm"))
  want = comp.allocation(key, base, cfg.replace(target_ratio=0.3))
  kept = {p: int(np.sum(np.asarray(budget.kept(lay)))) for p, lay in tree.factored_layers(start)}
  assert kept == want and len(set(want.values())) > 1
  assert int(sl.count_params(start, cfg)) > budget.target_params(start, cfg)  # above the CR 0.5 target
  res = comp.run_method("softlm", 0.5)
  assert res["budget"]["verdict"]["met"] and res["freeze_step"] > 0
  with pytest.raises(SystemExit):  # at or above the target: the thresholds would never move
    options.parse(cli.build_parser(), [*argv[:-2], "--start-allocation", "0.5"])
  with pytest.raises(ValueError, match="softlm-type"):
    run.check_start_allocation("static", 0.3, 0.5)


@slow
@needs_wikitext
def test_frontier_allocated_row_is_the_pipelines_allocated_method(tmp_path, compressed):
  """``experiments/frontier.py --rows allocated`` runs the pipeline's method (one source): the same
  ranks and perplexity as ``softlm compress`` on the same calibration windows."""
  import importlib.util
  import os
  from softlm_jax import cli, presets
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location("frontier", os.path.join(root, "experiments", "frontier.py"))
  frontier = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(frontier)
  frontier.main(["--model", "tiny-llama", "--rows", "allocated", "--crs", "0.5", "--calib", "8", "--seq-len", "32",
                 "--batch-size", "4", "--eval-windows", "2", "--eval-len", "64", "--out", str(tmp_path / "f"),
                 "--no-progress"])
  row = json.loads((tmp_path / "f" / "allocated-m0.5_cr0.5" / "results.json").read_text())
  # `softlm compress` at its default decomposition: the module's run, whose explicit one is that default
  assert presets.build("lm")[0].decomposition == "propagated"
  path = compressed[0] / "allocated" / "compact.safetensors"
  params, _ = sl.load_compact(path)
  assert {p: r for p, r in row["ranks"].items() if p in _ranks(params)} == _ranks(params)
  ev = cli.run(["eval", str(path), "--task", "wikitext", "--eval-len", "64", "--eval-windows", "2"])
  assert row["ppl"] == pytest.approx(ev["metrics"]["test"]["ppl"], rel=1e-5)


@slow
@needs_wikitext
def test_fine_tuning_takes_the_cosine_schedule_and_hidden_distillation(tmp_path):
  """``--lr-schedule cosine --warmup-steps 1 --distill-hidden W``: ``allocated``'s fine-tuning is Adam on
  that schedule with ``W`` x the hidden-state distillation beside the KD, the same as building both by
  hand from the pieces; a joint learned rule refuses the schedule by name."""
  import jax
  import optax
  from softlm_jax import cli, losses, optim, train
  from softlm_jax.cli import options
  argv = ["train", *SMALL, "--decomposition", "whitened", "--out", str(tmp_path), "--methods", "allocated",
          "--cr", "0.5", "--refit-steps", "0", "--steps", "3", "--lr", "1e-3", "--lr-schedule", "cosine",
          "--warmup-steps", "1", "--distill", "1.0", "--distill-hidden", "2.0"]
  o = options.parse(cli.build_parser(), argv).options
  assert (o.train.lr_schedule, o.train.warmup_steps, o.train.distill_hidden) == ("cosine", 1, 2.0)
  model, task = run.load(o.model, o.data)
  comp = run.Comparison(model, task, o.compression, o.train, str(tmp_path), log=lambda s: None)
  start, _ = comp.initial(run.parse_method("allocated"), 0.5)
  res = comp.run_method("allocated", 0.5)
  got, _ = sl.load_compact(tmp_path / "allocated" / "compact.safetensors")
  # the same three steps built by hand
  weight, temp = o.train.distill
  base = lambda logits, b: tasks.lm_loss(logits, b["inputs"])

  def by_hand(p, batch, rng):
    s_logits, s_hidden = model.hidden_fn()(p, batch["inputs"])
    t_logits, t_hidden = model.hidden_fn()(batch["teacher"], batch["inputs"])
    return (base(s_logits, batch) + weight * sl.distillation_loss(s_logits, t_logits, temperature=temp)
            + 2.0 * losses.hidden_distillation_loss(s_hidden, t_hidden))
  sched = optim.lr_schedule(1e-3, 3, "cosine", warmup_steps=1)
  tx = optax.adam(sched)
  state = train.init_state(start, tx, seed=o.train.seed)
  step = train.make_train_step(by_hand, tx)
  for k in range(3):
    state, _ = step(state, {**task.train_batch(k, o.train.batch_size, o.train.seed), "teacher": comp.teacher})
  assert res["train_steps"] == 3
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6)
  # the first update is the warmup's lr 0: a schedule that was not applied would move the weights at once
  assert float(sched(0)) == 0.0
  with pytest.raises(ValueError, match="softlm: lr_schedule='cosine' needs a run of known length"):
    comp.optimizer(run.parse_method("softlm"), comp.config(run.parse_method("softlm"), 0.5))
  with pytest.raises(ValueError, match="softlm: lr_schedule='cosine' needs a run of known length"):
    run.check_starts(o.train, ["allocated", "softlm"], [0.5])  # before anything trains


@slow
@needs_wikitext
def test_distillation_from_a_fine_tuned_teacher_file(tmp_path):
  """``dense-ft`` writes its fine-tuned model as ``teacher.safetensors``; ``--teacher-file`` makes it the
  distillation teacher: ``allocated``'s steps equal the same KD steps built by hand against that file's
  params (not the dense model's); a file of another tree, or none, is refused by name."""
  import jax
  import optax
  from softlm_jax import cli, train
  from softlm_jax.cli import options
  cli.run(["train", *SMALL, "--out", str(tmp_path / "d"), "--methods", "dense-ft", "--steps", "2", "--lr", "1e-2"])
  f = tmp_path / "d" / "dense-ft" / "teacher.safetensors"
  teacher, _ = sl.load_compact(f)
  argv = ["train", *SMALL, "--decomposition", "whitened", "--out", str(tmp_path / "a"), "--methods", "allocated",
          "--cr", "0.5", "--refit-steps", "0", "--steps", "2", "--lr", "1e-3", "--lr-schedule", "constant",
          "--warmup-steps", "0", "--distill", "1.0,2.0", "--teacher-file", str(f)]
  o = options.parse(cli.build_parser(), argv).options
  model, task = run.load(o.model, o.data)
  comp = run.Comparison(model, task, o.compression, o.train, str(tmp_path / "a"), log=lambda s: None)
  dense_moved = False
  for (k, a), b in zip(tree.flatten(comp.teacher).items(), tree.flatten(teacher).values()):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=k)
  for a, b in zip(jax.tree.leaves(comp.dense), jax.tree.leaves(teacher)):
    dense_moved |= not np.allclose(np.asarray(a), np.asarray(b))
  assert dense_moved  # the teacher is the fine-tuned model, not the dense one
  start, _ = comp.initial(run.parse_method("allocated"), 0.5)
  comp.run_method("allocated", 0.5)
  got, _ = sl.load_compact(tmp_path / "a" / "allocated" / "compact.safetensors")
  logits_fn = model.logits_fn()

  def by_hand(p, batch, rng):
    s_logits = logits_fn(p, batch["inputs"])
    return (tasks.lm_loss(s_logits, batch["inputs"])
            + sl.distillation_loss(s_logits, logits_fn(batch["teacher"], batch["inputs"]), temperature=2.0))
  tx = optax.adam(1e-3)
  state = train.init_state(start, tx, seed=o.train.seed)
  step = train.make_train_step(by_hand, tx)
  teacher_j = jax.tree.map(jax.numpy.asarray, teacher)
  for k in range(2):
    state, _ = step(state, {**task.train_batch(k, o.train.batch_size, o.train.seed), "teacher": teacher_j})
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6)
  # another tree (the compressed file) or no file: refused, naming the leaf / the file
  bad = str(tmp_path / "a" / "allocated" / "compact.safetensors")
  with pytest.raises(ValueError, match=r"teacher_file .*: leaf '.*' (is missing|is not in the dense model)"):
    run.load_teacher(bad, comp.dense)
  with pytest.raises(SystemExit):
    options.parse(cli.build_parser(), [*argv[:-1], str(tmp_path / "nope.safetensors")])


@slow
@needs_wikitext
def test_a_refit_that_wrecks_the_model_is_reverted_block_by_block(tmp_path):
  """The guard (default on): a refit at an absurd learning rate (10) keeps no block, the saved model's
  logits are the decomposition's, and the results and the summary say every block was reverted."""
  from softlm_jax import cli
  from softlm_jax.cli import options
  import jax.numpy as jnp
  o = options.parse(cli.build_parser(), ["train", *SMALL, "--decomposition", "whitened", "--out", str(tmp_path),
                                         "--methods", "static-refit", "--cr", "0.5", "--refit-steps", "8",
                                         "--refit-lr", "10"]).options
  assert o.train.guard_batches > 0 and o.train.refit_holdout == 0
  model, task = run.load(o.model, o.data)
  comp = run.Comparison(model, task, o.compression, o.train, str(tmp_path), log=lambda s: None)
  before, cfg = comp.initial(run.parse_method("static-refit"), 0.5)
  res = comp.run_method("static-refit", 0.5)
  blocks = res["refit"]["blocks"]
  n = len(blocks)
  assert n == 4 and res["refit"]["blocks_kept"] == 0
  assert all(not b["kept"] and b["heldout_after"] > b["heldout_before"] for b in blocks)
  after, _ = sl.load_compact(tmp_path / "static-refit" / "compact.safetensors")
  ids = jnp.asarray(task.windows["test"][:2, :32])

  def logits(p):
    with intercept(None):
      return np.asarray(model.logits(p, ids))
  np.testing.assert_array_equal(logits(after), logits(before))
  assert f"refit 8/block (0/{n} blocks kept)" in res["recipe"]
  assert f"0/{n} blocks kept" in (tmp_path / "static-refit" / "table.md").read_text()
  # the training-free variant of the same run trains nothing: no refit although refit_steps is 8
  noft = comp.run_method("static-noft", 0.5)
  assert "refit" not in noft and noft["recipe"] == "whitened"
  same, _ = sl.load_compact(tmp_path / "static-noft" / "compact.safetensors")
  np.testing.assert_array_equal(logits(same), logits(before))


def test_refit_variant_needs_refit_steps():
  """``-refit`` refuses refit_steps = 0; ``-noft`` and ``-refit`` compress the frozen teacher."""
  assert run.parse_method("allocated-noft").frozen and run.parse_method("allocated-refit").frozen
  assert not run.parse_method("allocated").frozen
  with pytest.raises(ValueError, match="allocated-refit is the decomposition followed by the block refit, but "
                     "refit_steps is 0"):
    run.check_starts(run.TrainConfig(refit_steps=0), ["allocated-refit"], [0.5])


@slow
@needs_wikitext
def test_fisher_scores_take_the_first_calib_scores_examples(tmp_path):
  """``--calib-scores N``: the allocation is the exact fill of the Fisher scores of the first N
  calibration examples on the factors of all ``--calib-grams`` ones; without it, of all of them."""
  from softlm_jax import cli, svd
  from softlm_jax.cli import options
  o = options.parse(cli.build_parser(), ["compress", *SMALL, "--preset", "lm", "--cr", "0.5", "--calib-scores", "4",
                                         "--out", str(tmp_path)]).options
  assert o.train.calib_scores == 4 and o.train.calib_grams == 8
  model, task = run.load(o.model, o.data, log=lambda s: None)
  comp = run.Comparison(model, task, o.compression, o.train, str(tmp_path), log=lambda s: None)
  method = run.parse_method("allocated")
  key, base = comp.base(method)
  cfg = comp.config(method, 0.5)
  got = comp.allocation(key, base, cfg)
  score_cfg = cfg.replace(decomposition="whitened", method="softlm")
  assert svd.get(cfg.decomposition).takes_ranks  # the lm preset's propagated: scored on whitened triplets
  full = allocate.full_rank(sl.compress_params(base, score_cfg, factors=comp.factors(key, base, score_cfg)), score_cfg)

  def reference(n):
    stats = allocate.triplet_stats(full, score_cfg, task.score_loss(model), task.score_batches(n, 4), progress=False)
    return allocate.allocate_ranks(full, cfg, allocate.drop_losses(stats))

  want4, want8 = reference(4), reference(8)
  assert got == want4 and want4 != want8
  with pytest.raises(ValueError, match="calib_scores"):
    run.TrainConfig(calib_grams=8, calib_scores=9)
