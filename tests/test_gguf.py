"""GGUF (llama.cpp) -> HF Flax Llama loader: the q/k row permutation, tiny GGUF files written here from
random Flax Llamas (float32 round trip is exact, quantized tensors equal gguf's own dequantization,
errors name the tensor), the byte-level BPE tokenizer, and (slow) the real SmolLM2 file vs PyTorch."""
import os

import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import rel_err

gguf = pytest.importorskip("gguf")
gl = pytest.importorskip("softlm_jax.models.gguf_llama")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ a", "i n"]


def byte_vocab():
  """A minimal GPT-2 style vocabulary: 3 control tokens, the 256 byte symbols, a few merges."""
  from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode
  byte_tokens = list(bytes_to_unicode().values())
  merged = [m.replace(" ", "") for m in MERGES]
  return SPECIALS + byte_tokens + merged


def tiny_config(**kw):
  from transformers import LlamaConfig
  base = dict(vocab_size=len(byte_vocab()), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64, rope_theta=10000.0,
              bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
  base.update(kw)
  return LlamaConfig(**base)


def tiny_llama(seed=0, **kw):
  from transformers import FlaxLlamaForCausalLM
  return FlaxLlamaForCausalLM(tiny_config(**kw), seed=seed)


def torch_weights(params, cfg, tied=False):
  """HF Flax params -> llama.cpp name -> numpy array in torch layout (out, in), q/k rows permuted
  as llama.cpp's converter does."""
  p = params
  out = {"token_embd.weight": p["model"]["embed_tokens"]["embedding"],
         "output_norm.weight": p["model"]["norm"]["weight"]}
  if not tied:
    out["output.weight"] = p["lm_head"]["kernel"].T
  for i in range(cfg.num_hidden_layers):
    layer = p["model"]["layers"][str(i)]
    for (group, proj), pattern in gl.LINEARS.items():
      w = np.asarray(layer[group][proj]["kernel"]).T
      if proj == "q_proj":
        w = gl.permute_qk(w, cfg.num_attention_heads)
      elif proj == "k_proj":
        w = gl.permute_qk(w, cfg.num_key_value_heads)
      out[pattern.format(i=i)] = w
    for norm, pattern in gl.NORMS.items():
      out[pattern.format(i=i)] = layer[norm]["weight"]
  return {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in out.items()}


def write_gguf(path, params, cfg, *, tied=False, qtypes=None, tokenizer=True, arch="llama", drop=(),
               replace=None):
  """A llama.cpp-style GGUF: the metadata keys its converter writes, llama.cpp tensor names, F32
  tensors unless ``qtypes`` (name -> GGMLQuantizationType) says otherwise."""
  w = gguf.GGUFWriter(str(path), arch)
  head_dim = cfg.hidden_size // cfg.num_attention_heads
  w.add_name("tiny")
  w.add_block_count(cfg.num_hidden_layers)
  w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.hidden_size)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(cfg.num_attention_heads)
  w.add_head_count_kv(cfg.num_key_value_heads)
  w.add_rope_freq_base(cfg.rope_theta)
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  w.add_file_type(gguf.LlamaFileType.ALL_F32)
  w.add_vocab_size(cfg.vocab_size)
  w.add_rope_dimension_count(head_dim)
  if tokenizer:
    tokens = byte_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL] * len(SPECIALS)
                      + [gguf.TokenType.NORMAL] * (len(tokens) - len(SPECIALS)))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)
  tensors = torch_weights(params, cfg, tied)
  tensors.update(replace or {})
  for name, t in tensors.items():
    if name in drop:
      continue
    q = (qtypes or {}).get(name)
    if q is None:
      w.add_tensor(name, t)
    else:
      w.add_tensor(name, gguf.quants.quantize(t, q), raw_dtype=q)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


def flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    out.update(flat(v, f"{prefix}{k}/") if isinstance(v, dict) else {prefix + k: np.asarray(v)})
  return out


@pytest.fixture(scope="module")
def orig():
  return tiny_llama()


@pytest.fixture
def ids():
  return jnp.asarray(np.random.RandomState(0).randint(0, len(byte_vocab()), (2, 12)), jnp.int32)


# --- permutation --------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_head,head_dim,rest", [(4, 8, (32,)), (3, 64, (5,)), (2, 4, ())])
def test_permute_qk_roundtrip_and_llama_cpp_definition(n_head, head_dim, rest):
  w = np.random.RandomState(1).randn(n_head * head_dim, *rest).astype(np.float32)
  p = gl.permute_qk(w, n_head)
  assert p.shape == w.shape and not np.array_equal(p, w)
  assert np.array_equal(gl.unpermute_qk(p, n_head), w)
  assert np.array_equal(gl.permute_qk(gl.unpermute_qk(w, n_head), n_head), w)
  # llama.cpp convert_hf_to_gguf.py: reshape(n_head, 2, d // n_head // 2, *rest).swapaxes(1, 2)
  d = w.shape[0]
  ref = w.reshape(n_head, 2, d // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
  assert np.array_equal(p, ref)
  # the same by rows: head h, rotary pair i -> llama.cpp rows 2i (first half) and 2i + 1 (second half)
  half = head_dim // 2
  for h in range(n_head):
    for i in range(half):
      assert np.array_equal(p[h * head_dim + 2 * i], w[h * head_dim + i])
      assert np.array_equal(p[h * head_dim + 2 * i + 1], w[h * head_dim + half + i])
  with pytest.raises(ValueError, match="n_head"):
    gl.permute_qk(w[:-1], n_head)


def test_unpermute_matches_transformers_reverse_permute():
  """Hugging Face's own GGUF loader (torch) undoes the permutation the same way."""
  utils = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")
  proc = utils.LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 2})
  w = np.random.RandomState(2).randn(2 * 8, 32).astype(np.float32)
  assert np.array_equal(gl.unpermute_qk(w, 2), proc._reverse_permute_weights(w, 4, 2))


# --- tiny GGUF round trips -----------------------------------------------------------------------------


def test_f32_roundtrip_exact(tmp_path, orig, ids):
  cfg = orig.config
  path = write_gguf(tmp_path / "tiny.gguf", orig.params, cfg)
  model, params, tok = gl.load_gguf_llama(path, tokenizer=False, progress=False)
  assert tok is None
  for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "max_position_embeddings", "rope_theta", "bos_token_id", "eos_token_id"):
    assert getattr(model.config, key) == getattr(cfg, key), key
  assert model.config.rms_norm_eps == pytest.approx(cfg.rms_norm_eps, rel=1e-6)  # stored as float32
  assert model.config.tie_word_embeddings is False
  got, want = flat(params), flat(orig.params)
  assert sorted(got) == sorted(want)
  for k in want:
    assert got[k].dtype == np.float32 and np.array_equal(got[k], want[k]), k
  out = model(ids, params=params).logits
  assert rel_err(out, orig(ids, params=orig.params).logits) < 1e-6


def test_tied_embeddings(tmp_path, orig, ids):
  path = write_gguf(tmp_path / "tied.gguf", orig.params, orig.config, tied=True)
  model, params, _ = gl.load_gguf_llama(path, tokenizer=False, progress=False)
  assert model.config.tie_word_embeddings is True and "lm_head" not in params
  untied = dict(orig.params, lm_head={"kernel": orig.params["model"]["embed_tokens"]["embedding"].T})
  assert rel_err(model(ids, params=params).logits, orig(ids, params=untied).logits) < 1e-6


def test_quantized_tensors_equal_gguf_dequantize(tmp_path, orig, ids):
  from gguf import GGMLQuantizationType as Q
  qtypes = {"token_embd.weight": Q.Q8_0, "blk.0.attn_q.weight": Q.Q8_0, "blk.0.attn_k.weight": Q.Q4_1,
            "blk.1.ffn_up.weight": Q.Q4_1, "output.weight": Q.Q4_1}
  cfg = orig.config
  path = write_gguf(tmp_path / "q.gguf", orig.params, cfg, qtypes=qtypes)
  reader = gguf.GGUFReader(str(path))
  assert {t.name: t.tensor_type for t in reader.tensors if t.name in qtypes} == qtypes
  model, params, _ = gl.load_gguf_llama(path, tokenizer=False, progress=False)
  raw = torch_weights(orig.params, cfg)
  deq = {}
  for t in reader.tensors:
    if t.name in qtypes:  # gguf's own dequantization of the stored blocks ...
      deq[t.name] = gguf.quants.dequantize(t.data, qtypes[t.name]).reshape(raw[t.name].shape)
      # ... equals quantize -> dequantize in memory, is really quantized and stays close (8 / 4 bits)
      mem = gguf.quants.dequantize(gguf.quants.quantize(raw[t.name], qtypes[t.name]), qtypes[t.name])
      assert np.array_equal(deq[t.name], mem), t.name
      assert 0 < rel_err(deq[t.name], raw[t.name]) < (0.01 if qtypes[t.name] == Q.Q8_0 else 0.1), t.name
  p, layers = params["model"], params["model"]["layers"]
  assert np.array_equal(p["embed_tokens"]["embedding"], deq["token_embd.weight"])
  assert np.array_equal(params["lm_head"]["kernel"], deq["output.weight"].T)
  assert np.array_equal(layers["0"]["self_attn"]["q_proj"]["kernel"], gl.unpermute_qk(deq["blk.0.attn_q.weight"], 4).T)
  assert np.array_equal(layers["0"]["self_attn"]["k_proj"]["kernel"], gl.unpermute_qk(deq["blk.0.attn_k.weight"], 2).T)
  assert np.array_equal(layers["1"]["mlp"]["up_proj"]["kernel"], deq["blk.1.ffn_up.weight"].T)
  # unquantized tensors are still exact; the quantized model stays near the original (random weights
  # quantize badly: 4-bit on the head alone moves the logits by ~10%)
  assert np.array_equal(layers["1"]["self_attn"]["q_proj"]["kernel"],
                        orig.params["model"]["layers"]["1"]["self_attn"]["q_proj"]["kernel"])
  assert rel_err(model(ids, params=params).logits, orig(ids, params=orig.params).logits) < 0.3


def test_rope_theta_and_gqa_match_pytorch_gguf_loader(tmp_path, ids):
  """An independent implementation: transformers' PyTorch GGUF loader on the same file (rotary base
  100000 as SmolLM2, which HF's Flax Llama would ignore; tied embeddings; grouped KV heads)."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("accelerate", reason="transformers' GGUF loader needs accelerate")
  from transformers import AutoModelForCausalLM
  src = tiny_llama(seed=3, rope_theta=100000.0)
  sharp = dict(src.params)  # larger q/k: peaked attention, so positions (the rotary base) matter
  sharp["model"] = dict(sharp["model"], layers={
      i: dict(layer, self_attn={k: {"kernel": v["kernel"] * (30.0 if k in ("q_proj", "k_proj") else 1.0)}
                                for k, v in layer["self_attn"].items()})
      for i, layer in src.params["model"]["layers"].items()})
  path = write_gguf(tmp_path / "theta.gguf", sharp, src.config, tied=True)
  model, params, _ = gl.load_gguf_llama(path, tokenizer=False, progress=False)
  assert model.config.rope_theta == 100000.0
  ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="theta.gguf", dtype=torch.float32)
  with torch.no_grad():
    want = ref(torch.tensor(np.asarray(ids))).logits.numpy()
  assert rel_err(model(ids, params=params).logits, want) < 1e-5
  # HF's Flax Llama (rotary base 10000) differs: the base really matters here
  hf = src.__class__(src.config, _do_init=False)
  untied = dict(params, lm_head={"kernel": params["model"]["embed_tokens"]["embedding"].T})
  assert rel_err(hf(ids, params=untied).logits, want) > 1e-2


def test_bfloat16(tmp_path, orig, ids):
  path = write_gguf(tmp_path / "tiny.gguf", orig.params, orig.config)
  model, params, _ = gl.load_gguf_llama(path, jnp.bfloat16, tokenizer=False, progress=False)
  assert {v.dtype for v in flat(params).values()} == {jnp.dtype(jnp.bfloat16)}
  out = model(ids, params=params).logits
  assert rel_err(out.astype(jnp.float32), orig(ids, params=orig.params).logits) < 0.05


# --- errors ---------------------------------------------------------------------------------------------


def test_missing_tensor_named(tmp_path, orig):
  path = write_gguf(tmp_path / "m.gguf", orig.params, orig.config, drop=("blk.1.ffn_up.weight",))
  with pytest.raises(ValueError, match=r"blk\.1\.ffn_up\.weight \(expected shape \(48, 32\)\)"):
    gl.load_gguf_llama(path, tokenizer=False, progress=False)


def test_wrong_shape_named(tmp_path, orig):
  bad = {"blk.0.ffn_gate.weight": np.zeros((40, 32), np.float32)}
  path = write_gguf(tmp_path / "s.gguf", orig.params, orig.config, replace=bad)
  with pytest.raises(ValueError, match=r"blk\.0\.ffn_gate\.weight has shape \(40, 32\), expected \(48, 32\)"):
    gl.load_gguf_llama(path, tokenizer=False, progress=False)
  # the in-memory path checks too
  tensors = torch_weights(orig.params, orig.config)
  tensors["output_norm.weight"] = np.zeros(31, np.float32)
  with pytest.raises(ValueError, match=r"output_norm\.weight has shape \(31,\), expected \(32,\)"):
    gl.gguf_to_flax_params(tensors, orig.config)


def test_unknown_tensor_and_architecture(tmp_path, orig):
  extra = {"blk.0.attn_q.bias": np.zeros(32, np.float32)}
  path = write_gguf(tmp_path / "b.gguf", orig.params, orig.config, replace=extra)
  with pytest.raises(ValueError, match=r"blk\.0\.attn_q\.bias \(shape \(32,\)\)"):
    gl.load_gguf_llama(path, tokenizer=False, progress=False)
  path = write_gguf(tmp_path / "g.gguf", orig.params, orig.config, arch="gpt2")
  with pytest.raises(ValueError, match="unsupported GGUF architecture 'gpt2'"):
    gl.load_gguf_llama(path, progress=False)


# --- tokenizer ------------------------------------------------------------------------------------------


def test_byte_level_tokenizer(tmp_path, orig):
  path = write_gguf(tmp_path / "tok.gguf", orig.params, orig.config)
  _, _, tok = gl.load_gguf_llama(path, progress=False)
  vocab = {t: i for i, t in enumerate(byte_vocab())}
  assert tok.bos_token == "<|im_start|>" and tok.eos_token == "<|im_end|>" and tok.unk_token == "<|endoftext|>"
  ids = tok("the the<|im_end|>").input_ids
  assert ids == [1, vocab["t"], vocab["he"], vocab["Ġthe"], 2]  # BOS as transformers' GGUF tokenizer
  text = "Héllo wörld, in 2024 😀 <|im_start|>"
  assert tok.decode(tok(text).input_ids, skip_special_tokens=False) == "<|im_start|>" + text
  # None: the file's own tokenizer.ggml.add_bos_token (False here), as llama.cpp does
  plain = gl.gguf_tokenizer(path, add_bos_token=None)
  assert plain("the the").input_ids == [vocab["t"], vocab["he"], vocab["Ġthe"]]
  path = write_gguf(tmp_path / "notok.gguf", orig.params, orig.config, tokenizer=False)
  with pytest.raises(ValueError, match="no tokenizer"):
    gl.load_gguf_llama(path, progress=False)


def test_tokenizer_cache_gives_the_built_tokenizer_without_reading_the_file(tmp_path, orig, monkeypatch):
  """The second ``gguf_tokenizer`` call loads the cached tokenizer (the GGUF header is not parsed again)
  and encodes and decodes exactly as the one built from the file; a rewritten file gets a new entry;
  ``SOFTLM_CACHE_DIR=0`` turns the cache off."""
  path = write_gguf(tmp_path / "tok.gguf", orig.params, orig.config)
  monkeypatch.setenv("SOFTLM_CACHE_DIR", str(tmp_path / "cache"))
  built = gl.gguf_tokenizer(path)
  entries = os.listdir(tmp_path / "cache" / "gguf_tokenizers")
  assert len(entries) == 1 and not entries[0].startswith(".tmp")
  real_meta = gl.gguf_metadata

  def no_read(*a, **k):
    raise AssertionError("the GGUF header was parsed again")
  monkeypatch.setattr(gl, "gguf_metadata", no_read)
  cached = gl.gguf_tokenizer(path)
  texts = ["the the<|im_end|>", "Héllo wörld, in 2024 😀 <|im_start|>", " leading space\n\nand lines"]
  for t in texts:
    assert cached(t).input_ids == built(t).input_ids, t
    ids = built(t).input_ids
    assert cached.decode(ids, skip_special_tokens=False) == built.decode(ids, skip_special_tokens=False)
  for k in ("bos_token", "eos_token", "unk_token", "pad_token", "model_max_length", "chat_template"):
    assert getattr(cached, k, None) == getattr(built, k, None), k
  # add_bos_token=None is another entry (and reads the file once)
  monkeypatch.setattr(gl, "gguf_metadata", real_meta)
  plain = gl.gguf_tokenizer(path, add_bos_token=None)
  assert plain("the the").input_ids == built("the the").input_ids[1:]
  assert len(os.listdir(tmp_path / "cache" / "gguf_tokenizers")) == 2
  st = os.stat(path)  # a rewritten file (new mtime): a new entry, built from the file
  os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  gl.gguf_tokenizer(path)
  assert len(os.listdir(tmp_path / "cache" / "gguf_tokenizers")) == 3
  # off: builds from the file every time, writes nothing
  monkeypatch.setenv("SOFTLM_CACHE_DIR", "0")
  monkeypatch.setattr(gl, "gguf_metadata", no_read)
  with pytest.raises(AssertionError, match="parsed again"):
    gl.gguf_tokenizer(path)


# --- the real file ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_matches_pytorch():
  """SmolLM2-135M-Instruct Q4_1: our Flax logits vs transformers' PyTorch GGUF loader, and tokenizer ids."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("accelerate", reason="transformers' GGUF loader needs accelerate")
  from transformers import AutoModelForCausalLM, AutoTokenizer
  try:
    path = gl.smollm2_gguf_path()
  except FileNotFoundError as e:
    pytest.skip(str(e))
  model, params, tok = gl.load_gguf_llama(path, progress=False)
  cfg = model.config
  assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
          cfg.intermediate_size, cfg.vocab_size, cfg.rope_theta, cfg.tie_word_embeddings) == \
      (30, 576, 9, 3, 1536, 49152, 100000.0, True)
  n = sum(v.size for v in flat(params).values())
  assert n == 134_515_008  # as the PyTorch LlamaForCausalLM (tied head counted once)
  text = ("Robert Boulter is an English film , television and theatre actor . He had a guest-starring role "
          "on the television series The Bill in 2000 , followed by roles in plays. Héllo 😀 <|im_end|>")
  folder, name = os.path.split(path)
  hf_tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
  assert tok(text).input_ids == hf_tok(text).input_ids
  ids = np.asarray(tok(text).input_ids[:32])[None]
  assert ids.shape == (1, 32)
  ref = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
  with torch.no_grad():
    want = ref(torch.tensor(ids)).logits.numpy()
  got = np.asarray(model(jnp.asarray(ids), params=params).logits)
  err = rel_err(got, want)
  print(f"SmolLM2 Flax vs PyTorch: max abs diff / max abs = {err:.2e}")
  assert err < 1e-4
  sd = ref.state_dict()
  for i in (0, 29):
    for proj in ("q_proj", "k_proj"):
      assert np.array_equal(params["model"]["layers"][str(i)]["self_attn"][proj]["kernel"],
                            sd[f"model.layers.{i}.self_attn.{proj}.weight"].numpy().T)
