import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if os.environ.get("SOFTLM_TEST_JAX_CACHE", "1") != "0" and (
    "JAX_COMPILATION_CACHE_DIR" not in os.environ or "SOFTLM_TEST_JAX_CACHE_ROOT" in os.environ):
  # One persistent XLA cache for the session, inherited by its subprocesses: the tests build the same
  # tiny models and steps again and again in new closures, which jax's in-memory cache cannot reuse; the
  # persistent cache is keyed by the computation itself. One folder per xdist worker (jax writes its
  # entries unlocked). SOFTLM_TEST_JAX_CACHE=0: off.
  if "SOFTLM_TEST_JAX_CACHE_ROOT" not in os.environ:
    import atexit
    import shutil
    import tempfile
    os.environ["SOFTLM_TEST_JAX_CACHE_ROOT"] = tempfile.mkdtemp(prefix="softlm-test-xla-cache-")
    atexit.register(shutil.rmtree, os.environ["SOFTLM_TEST_JAX_CACHE_ROOT"], True)
  os.environ.update({
      "JAX_COMPILATION_CACHE_DIR": os.path.join(os.environ["SOFTLM_TEST_JAX_CACHE_ROOT"],
                                                os.environ.get("PYTEST_XDIST_WORKER", "main")),
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"})

if "SOFTLM_CACHE_DIR" not in os.environ:
  # softlm_jax's own disk cache (the GGUF tokenizer) for this session only, shared by its workers and
  # subprocesses: a test never reads a cache that another session (or the user) wrote
  import atexit as _atexit
  import shutil as _shutil
  import tempfile as _tempfile
  os.environ["SOFTLM_CACHE_DIR"] = _tempfile.mkdtemp(prefix="softlm-test-cache-")
  _atexit.register(_shutil.rmtree, os.environ["SOFTLM_CACHE_DIR"], True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

VOCAB = 97


def tiny_models():
  """name -> (model class, config): tiny random HF Flax models (seconds to build and run)."""
  from transformers import (BertConfig, FlaxBertForSequenceClassification, FlaxGPT2LMHeadModel,
                            FlaxLlamaForCausalLM, GPT2Config, LlamaConfig)
  return {
      "bert": (FlaxBertForSequenceClassification,
               BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=48, max_position_embeddings=64)),
      "gpt2": (FlaxGPT2LMHeadModel,
               GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
      "llama": (FlaxLlamaForCausalLM,
                LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64)),
  }


_CACHE = {}


def build(name, seed=0):
  if (name, seed) not in _CACHE:
    cls, cfg = tiny_models()[name]
    _CACHE[(name, seed)] = cls(cfg, seed=seed)
  return _CACHE[(name, seed)]


@pytest.fixture(params=["bert", "gpt2", "llama"])
def tiny(request):
  return request.param, build(request.param)


@pytest.fixture
def ids():
  return jnp.asarray(np.random.RandomState(0).randint(0, VOCAB, (2, 12)), jnp.int32)


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def tiny_folder(path, kind="classifier", num_labels=2):
  """A saved tiny random HF model with the real MiniLM tokenizer (vocab 30522), for end-to-end runs:
  ``kind`` ``"classifier"`` (BERT, hidden 16) or ``"causal"`` (Llama with GQA, hidden 16)."""
  import shutil

  from transformers import BertConfig, FlaxBertForSequenceClassification, FlaxLlamaForCausalLM, LlamaConfig

  from softlm_jax.models import weights
  if kind == "classifier":
    model = FlaxBertForSequenceClassification(BertConfig(
        vocab_size=30522, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=64, num_labels=num_labels), seed=0)
  else:
    model = FlaxLlamaForCausalLM(LlamaConfig(
        vocab_size=30522, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=32, max_position_embeddings=128, pad_token_id=0, eos_token_id=102, bos_token_id=101), seed=0)
  model.save_pretrained(path)
  src = weights.minilm_dir()
  for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    shutil.copy(os.path.join(src, f), os.path.join(path, f))
  return str(path)
