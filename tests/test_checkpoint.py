"""Compact checkpoints: bit-equal round trips (BERT, GPT-2 out_in, Llama GQA), the manifest's ranks,
the errors for truncated / wrong-version / mismatched files, an interrupted save, and generation."""
import json
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import softlm_jax as sl
from softlm_jax import checkpoint, files
from tests.conftest import build

CFG = sl.CompressionConfig(target_ratio=0.5)


def trained_export(model, seed=0):
  """A SoftLM-form tree with non-uniform thresholds, exported: uneven ranks, some layers kept dense."""
  cp = sl.compress_params(model.params, CFG)
  qs = np.roll([0.7, 0.85, 0.02, 0.6, 0.9], seed)  # quantile of s at which each layer's threshold sits
  order = {p: i for i, (p, _) in enumerate(sl.tree.factored_layers(cp))}

  def visit(path, node):
    if path in order:
      return {**node, "alpha": jnp.quantile(node["s"], qs[order[path] % len(qs)])}
    return node
  trained = sl.tree.map_modules(cp, visit)
  return trained, sl.export_params(trained, CFG)


def logits(model, params, ids):
  with sl.intercept(CFG):
    return np.asarray(jax.jit(lambda p, x: model(x, params=p).logits)(params, ids))


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_round_trip_bit_equal_logits_and_manifest_ranks(tmp_path, name, ids):
  model = build(name)
  trained, ex = trained_export(model)
  path = tmp_path / "m.safetensors"
  man = sl.save_compact(path, ex, cfg=CFG, model_config=model.config,
                        metadata={"method": "softlm", "source_model": f"tiny-{name}"})
  loaded, info = sl.load_compact(path)
  assert np.array_equal(logits(model, loaded, ids), logits(model, ex, ids))
  assert info == json.loads(json.dumps(man))
  forms = {v["form"] for v in info["layers"].values()}
  assert forms == {"factored", "dense"}, forms  # the quantile 0.02 layers are kept dense by export
  assert {p: v["rank"] for p, v in info["layers"].items()} == {p: int(r) for p, r in sl.layer_ranks(ex, CFG).items()}
  trained_ranks = {p: int(r) for p, r in sl.layer_ranks(trained, CFG).items()}
  assert all(trained_ranks[p] == v["rank"] for p, v in info["layers"].items() if v["form"] == "factored")
  assert {p: int(r) for p, r in sl.layer_ranks(loaded).items()} == \
      {p: v["rank"] for p, v in info["layers"].items() if v["form"] == "factored"}
  assert info["counted_params"] == int(sl.count_params(ex, CFG)) == int(sl.count_params(trained, CFG))
  assert info["method"] == "softlm" and info["source_model"] == f"tiny-{name}" and info["dtype"] == "float32"
  assert info["model_config"]["model_type"] == model.config.model_type
  assert info["format_version"] == checkpoint.FORMAT_VERSION and info["library_version"] == sl.__version__
  # on disk: the compact arrays plus the header, nothing else
  rep = checkpoint.file_report(path)
  leaves = jax.tree.leaves(ex)
  assert rep["array_bytes"] == sum(x.nbytes for x in leaves)
  assert rep["file_bytes"] == rep["array_bytes"] + rep["header_bytes"]
  assert rep["params"] == rep["counted_params"] + rep["other_params"] == sum(x.size for x in leaves)


def test_bfloat16_round_trip(tmp_path, ids):
  model = build("gpt2")
  _, ex = trained_export(model)
  ex16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), ex)
  sl.save_compact(tmp_path / "b.safetensors", ex16, cfg=CFG)
  loaded, info = sl.load_compact(tmp_path / "b.safetensors")
  assert info["dtype"] == "bfloat16"
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(ex16)):
    assert a.dtype == b.dtype and np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_training_form_is_refused(tmp_path):
  trained, _ = trained_export(build("bert"))
  with pytest.raises(ValueError, match=r"layer 'bert/encoder/layer/0/.*training form.*export_params"):
    sl.save_compact(tmp_path / "t.safetensors", trained, cfg=CFG)
  assert not os.listdir(tmp_path)  # nothing written, not even a temp file


def saved(tmp_path):
  _, ex = trained_export(build("bert"))
  path = tmp_path / "m.safetensors"
  sl.save_compact(path, ex, cfg=CFG)
  return path, ex


def rewrite_header(path, edit):
  """Rewrites a safetensors file's JSON header through ``edit(header_dict)``; the data is kept."""
  raw = path.read_bytes()
  n = struct.unpack("<Q", raw[:8])[0]
  header = json.loads(raw[8:8 + n])
  edit(header)
  new = json.dumps(header).encode()
  new += b" " * (-len(new) % 8)
  path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def test_missing_and_truncated_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.safetensors does not exist"):
    sl.load_compact(tmp_path / "nope.safetensors")
  path, _ = saved(tmp_path)
  raw = path.read_bytes()
  path.write_bytes(raw[:len(raw) - 100])  # cut inside the data
  with pytest.raises(sl.CheckpointError, match=r"m\.safetensors.*truncated or corrupt"):
    sl.load_compact(path)
  path.write_bytes(raw[:50])  # cut inside the header
  with pytest.raises(sl.CheckpointError, match=r"m\.safetensors.*truncated or corrupt"):
    sl.load_compact(path)


def test_wrong_format_version(tmp_path):
  path, _ = saved(tmp_path)

  def bump(h):
    man = json.loads(h["__metadata__"]["softlm"])
    man["format_version"] = 99
    h["__metadata__"]["softlm"] = json.dumps(man)
  rewrite_header(path, bump)
  with pytest.raises(sl.CheckpointError, match=r"m\.safetensors: format_version 99 is not supported.*reads version 1"):
    sl.load_compact(path)


def test_shape_mismatch_names_file_and_key(tmp_path):
  path, ex = saved(tmp_path)
  man = checkpoint.read_manifest(path)
  layer = next(p for p, v in man["layers"].items() if v["form"] == "factored")
  key = f"{layer}/left"

  def lie(h):  # the manifest claims one rank more than the arrays have
    m = json.loads(h["__metadata__"]["softlm"])
    m["layers"][layer]["rank"] += 1
    h["__metadata__"]["softlm"] = json.dumps(m)
  rewrite_header(path, lie)
  with pytest.raises(sl.CheckpointError, match=rf"m\.safetensors: key '{key}' has shape .* needs"):
    sl.load_compact(path)

  path2, _ = saved(tmp_path / "b")

  def lie_array(h):  # the manifest's array list disagrees with the tensor
    m = json.loads(h["__metadata__"]["softlm"])
    m["arrays"][key]["shape"] = [7, 7]
    h["__metadata__"]["softlm"] = json.dumps(m)
  rewrite_header(path2, lie_array)
  with pytest.raises(sl.CheckpointError, match=rf"key '{key}' has shape .*manifest says \(7, 7\)"):
    sl.load_compact(path2)


def test_interrupted_save_keeps_previous_file(tmp_path, monkeypatch, ids):
  model = build("bert")
  path, ex = saved(tmp_path)
  before = path.read_bytes()
  _, other = trained_export(model, seed=1)

  def dies_half_way(name):  # half of the bytes written at the temp name, then the process "dies"
    if name == "file_write:m.safetensors":
      raise KeyboardInterrupt("killed during the write")
  monkeypatch.setattr(files, "fault_point", dies_half_way)
  with pytest.raises(KeyboardInterrupt):
    sl.save_compact(path, other, cfg=CFG)
  assert path.read_bytes() == before and os.listdir(tmp_path) == ["m.safetensors"]
  loaded, _ = sl.load_compact(path)
  assert np.array_equal(logits(model, loaded, ids), logits(model, ex, ids))


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_generate_from_loaded_compact_model(tmp_path, name):
  """HF Flax ``generate`` (greedy) runs under intercept on a loaded compact tree, and agrees with a
  greedy loop over full forwards."""
  from softlm_jax.models import hf
  model = build(name)
  _, ex = trained_export(model)
  sl.save_compact(tmp_path / "g.safetensors", ex, cfg=CFG)
  loaded, _ = sl.load_compact(tmp_path / "g.safetensors")
  prompt = jnp.asarray(np.random.RandomState(3).randint(1, 97, (2, 5)), jnp.int32)
  out = hf.generate(model, loaded, prompt, max_new_tokens=6, cfg=CFG)
  seq = prompt
  for _ in range(6):
    nxt = logits(model, loaded, seq)[:, -1].argmax(-1)
    seq = jnp.concatenate([seq, jnp.asarray(nxt, jnp.int32)[:, None]], 1)
  assert out.shape == (2, 11) and np.array_equal(np.asarray(out), np.asarray(seq))


# --- checksums -------------------------------------------------------------------------------------

def _tiny_keys():
  _, ex = trained_export(build("bert"))
  return sorted(sl.tree.flatten(ex))


@pytest.fixture(scope="module")
def saved_once(tmp_path_factory):
  folder = tmp_path_factory.mktemp("digests")
  path, ex = saved(folder)
  return path, ex


def _flip_byte(path, key, out):
  """A copy of ``path`` with one byte flipped in the middle of ``key``'s data."""
  raw = bytearray(path.read_bytes())
  n = struct.unpack("<Q", raw[:8])[0]
  begin, end = json.loads(raw[8:8 + n])[key]["data_offsets"]
  raw[8 + n + (begin + end) // 2] ^= 0x10
  out.write_bytes(bytes(raw))
  return out


@pytest.mark.parametrize("key", _tiny_keys())
def test_one_flipped_byte_in_any_array_names_the_key(saved_once, tmp_path, key):
  path, ex = saved_once
  bad = _flip_byte(path, key, tmp_path / "bad.safetensors")
  with pytest.raises(sl.CheckpointError, match=rf"bad\.safetensors: key '{key}' fails its checksum"):
    sl.load_compact(bad)
  loaded, _ = sl.load_compact(bad, verify=False)  # the caller's choice: loads, the byte still flipped
  a, b = np.asarray(sl.tree.flatten(loaded)[key]), np.asarray(sl.tree.flatten(ex)[key])
  assert a.shape == b.shape and not np.array_equal(a, b)
  others = {k: v for k, v in sl.tree.flatten(loaded).items() if k != key}
  assert all(np.array_equal(np.asarray(v), np.asarray(sl.tree.flatten(ex)[k])) for k, v in others.items())


def test_digests_are_of_the_stored_bytes(saved_once):
  path, ex = saved_once
  man = checkpoint.read_manifest(path)
  import hashlib
  want = {k: hashlib.sha256(np.asarray(v).tobytes()).hexdigest() for k, v in sl.tree.flatten(ex).items()}
  assert {k: v["sha256"] for k, v in man["arrays"].items()} == want == checkpoint.file_digests(path)


def test_bfloat16_digests_verify(tmp_path):
  _, ex = trained_export(build("gpt2"))
  ex16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), ex)
  path = tmp_path / "b.safetensors"
  sl.save_compact(path, ex16, cfg=CFG)
  sl.load_compact(path)  # verifies
  key = sorted(checkpoint.read_manifest(path)["arrays"])[0]
  with pytest.raises(sl.CheckpointError, match=rf"key '{key}' fails its checksum"):
    sl.load_compact(_flip_byte(path, key, tmp_path / "c.safetensors"))


def test_file_without_digests_loads_with_a_warning(tmp_path, ids):
  path, ex = saved(tmp_path)

  def strip(h):  # a file written before the manifest carried array digests
    m = json.loads(h["__metadata__"]["softlm"])
    for v in m["arrays"].values():
      del v["sha256"]
    del m["manifest_sha256"]
    h["__metadata__"]["softlm"] = json.dumps(m)
  rewrite_header(path, strip)
  with pytest.warns(UserWarning, match=r"m\.safetensors: the manifest has no array digests"):
    loaded, _ = sl.load_compact(path)
  model = build("bert")
  assert np.array_equal(logits(model, loaded, ids), logits(model, ex, ids))


def _edit_manifest(path, field, value, *, redigest):
  """Sets one manifest field in place (arrays untouched); ``redigest``: also rewrite manifest_sha256 so
  that only the claims check can catch the edit."""
  def edit(h):
    m = json.loads(h["__metadata__"]["softlm"])
    node = m
    *parents, leaf = field
    for p in parents:
      node = node[p]
    node[leaf] = value
    if redigest:
      m["manifest_sha256"] = checkpoint.manifest_digest(m)
    h["__metadata__"]["softlm"] = json.dumps(m)
  rewrite_header(path, edit)


def test_an_edited_manifest_field_fails_its_digest(tmp_path):
  path, _ = saved(tmp_path)
  _edit_manifest(path, ["achieved_ratio"], 0.9, redigest=False)
  with pytest.raises(sl.CheckpointError, match="the manifest fails its checksum"):
    sl.load_compact(path)


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("field,value,named", [
    (["achieved_ratio"], 0.9, r"achieved_ratio = 0\.9, the arrays give 0\.[0-9]+"),
    (["counted_params"], 1, r"counted_params = 1, the arrays give [0-9]+"),
    (["dense_params"], 7, r"dense_params = 7, the arrays give [0-9]+"),
    (["dtype"], "bfloat16", r"dtype = 'bfloat16', the arrays give 'float32'"),
])
def test_a_manifest_claim_is_recomputed_from_the_arrays(tmp_path, field, value, named, verify):
  """A manifest whose digest was rewritten with the edit still cannot claim what the arrays do not
  say; verify=False (digests skipped) checks the claims all the same."""
  path, _ = saved(tmp_path)
  _edit_manifest(path, field, value, redigest=True)
  with pytest.raises(sl.CheckpointError, match=named):
    sl.load_compact(path, verify=verify)


def test_a_layer_claim_is_recomputed_from_the_arrays(tmp_path):
  path, _ = saved(tmp_path)
  man = checkpoint.read_manifest(path)
  layer = sorted(p for p, v in man["layers"].items() if v["form"] == "factored")[0]
  _edit_manifest(path, ["layers", layer, "params"], 5, redigest=True)
  with pytest.raises(sl.CheckpointError, match=rf"layers\['{layer}'\]\.params = 5, the arrays give [0-9]+"):
    sl.load_compact(path, verify=False)
