"""``R-alloc`` methods end to end on a tiny Llama: with zero updates the learned selection is its start,
so the file is the allocated (or, from uniform, the static) method's array for array, and ``R-alloc-ft``'s
is ``allocated``'s (the same fine-tuning); with updates the ranks move, the count stays at the target, and
the file holds the learned ranks."""
import json

import numpy as np
import pytest

import softlm_jax as sl
from softlm_jax import budget, cli, data, tree

pytestmark = [pytest.mark.slow,  # whole tiny-Llama runs: scripts/test.sh --all
              pytest.mark.skipif(data.find_data_dir() is None, reason="needs ../shared/data (WikiText-2)")]

LM = ["--task", "wikitext", "--model", "tiny-llama", "--seq-len", "32", "--calib-len", "32", "--eval-len", "32",
      "--eval-windows", "2", "--calib-grams", "8", "--calib", "8", "--batch-size", "4", "--no-progress", "--cr", "0.5"]


def compact(path):
  params, man = sl.load_compact(path)
  return {k: np.asarray(v) for k, v in tree.flatten(params).items()}, {p: v["rank"] for p, v in man["layers"].items()}


def results(folder, method):
  return json.loads((folder / method / "results.json").read_text())


@pytest.mark.parametrize("start,reference", [("allocation", "allocated-noft"), ("uniform", "static-noft")])
def test_zero_updates_give_the_start_file(tmp_path, start, reference):
  methods = f"{reference},llrc-alloc" + (",softlm-alloc" if start == "allocation" else "")
  cli.run(["train", *LM, "--methods", methods, "--select-steps", "0", "--select-from", start, "--out", str(tmp_path)])
  want, want_ranks = compact(tmp_path / reference / "compact.safetensors")
  for m in methods.split(",")[1:]:
    got, ranks = compact(tmp_path / m / "compact.safetensors")
    assert ranks == want_ranks and got.keys() == want.keys(), m
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=f"{m}: {k}")
    res = results(tmp_path, m)
    assert res["selection"]["layers_changed"] == 0 and res["selection"]["start"] == start
    assert res["metrics"] == results(tmp_path, reference)["metrics"]


def test_alloc_ft_is_the_allocated_fine_tuning_of_the_selection(tmp_path):
  """With zero selection updates ``llrc-alloc-ft`` fine-tunes the ``allocated-noft`` file with
  ``allocated``'s steps, batches and guard, so (no refit) its file is ``allocated``'s."""
  cli.run(["train", *LM, "--methods", "allocated,llrc-alloc,llrc-alloc-ft", "--select-steps", "0",
           "--refit-steps", "0", "--steps", "3", "--out", str(tmp_path)])
  want, want_ranks = compact(tmp_path / "allocated" / "compact.safetensors")
  got, ranks = compact(tmp_path / "llrc-alloc-ft" / "compact.safetensors")
  assert ranks == want_ranks and got.keys() == want.keys()
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7, err_msg=k)
  res, ref = results(tmp_path, "llrc-alloc-ft"), results(tmp_path, "allocated")
  assert res["train_steps"] == 3 and res["selection_steps"] == 0 and res["selection"]["layers_changed"] == 0
  assert res["reused"] and res["guard"]["steps"][0]["step"] == "fine-tuning"
  assert res["recipe"].endswith("fine-tuning 3 steps" + ("" if ref["guard"]["steps"][-1]["kept"] else " (reverted)"))
  m = ref["main_metric"]
  np.testing.assert_allclose(res["metrics"]["test"][m], ref["metrics"]["test"][m], rtol=1e-5)


def test_updates_move_the_ranks_at_the_budget(tmp_path):
  cli.run(["train", *LM, "--methods", "llrc-alloc", "--select-steps", "6", "--out", str(tmp_path)])
  res = results(tmp_path, "llrc-alloc")
  sel = res["selection"]
  _, man = sl.load_compact(tmp_path / "llrc-alloc" / "compact.safetensors")
  b = res["budget"]
  shapes = {p: tuple(v["shape"]) for p, v in man["layers"].items()}
  # the file holds the learned ranks (a layer at or above break-even is kept dense, at full rank)
  assert {p: v["rank"] for p, v in man["layers"].items()} == {
      p: r if r < budget.break_even_rank(*shapes[p]) else min(shapes[p]) for p, r in sel["ranks"].items()}
  assert sel["layers_changed"] > 0 and sel["ranks"] != sel["start_ranks"]
  assert res["train_steps"] == 6
  step = 2 * max(r + c for r, c in shapes.values())  # one triplet (under twice rows + cols at a dense jump)
  assert b["target_params"] - step < b["counted_params"] <= b["target_params"]
  counted = sum(int(budget.layer_cost(r, *shapes[p])) for p, r in sel["ranks"].items())
  assert counted == b["counted_params"]
