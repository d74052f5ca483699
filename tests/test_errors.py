"""Bad input gives errors that name the layer, the shape and what was expected."""
import jax.numpy as jnp
import numpy as np
import pytest

import softlm_jax as sl


def params_with(kernel, name="query"):
  return {"encoder": {"layer": {"0": {name: {"kernel": kernel, "bias": jnp.zeros(kernel.shape[-1])}}}}}


def test_nan_kernel():
  k = np.ones((4, 6), np.float32)
  k[1, 2] = np.nan
  k[0, 0] = np.inf
  with pytest.raises(ValueError, match=r"encoder/layer/0/query.*\(4, 6\).*2 NaN/Inf"):
    sl.compress_params(params_with(jnp.asarray(k)), sl.CompressionConfig())


def test_selected_non_2d_kernel():
  p = params_with(jnp.ones((4, 1, 6)), name="conv")
  with pytest.raises(ValueError, match=r"encoder/layer/0/conv.*\(4, 1, 6\).*2-D"):
    sl.compress_params(p, sl.CompressionConfig(include="conv"))
  # the default selection skips it (nothing else there, so: nothing matched)
  with pytest.raises(ValueError, match="no kernel matched"):
    sl.compress_params(p, sl.CompressionConfig())


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_target_ratio_out_of_range(ratio):
  with pytest.raises(ValueError, match=r"target_ratio must be in \(0, 1\)"):
    sl.CompressionConfig(target_ratio=ratio)


def test_include_matches_nothing():
  with pytest.raises(ValueError, match=r"no kernel matched include='nothing_here'.*encoder/layer/0/query"):
    sl.compress_params(params_with(jnp.ones((4, 6))), sl.CompressionConfig(include="nothing_here"))


def test_unknown_loss_and_bad_options():
  with pytest.raises(ValueError, match=r"unknown loss 'quadratic'.*adaptive.*linear"):
    sl.CompressionConfig(loss="quadratic")
  with pytest.raises(ValueError, match="init_rank"):
    sl.CompressionConfig(init_rank="half")
  with pytest.raises(ValueError, match="not a valid regex"):
    sl.CompressionConfig(include="(")


def test_budget_freeze_needs_params():
  import optax
  tx = sl.make_optimizer(sl.CompressionConfig(), optax.sgd(0.1))
  p = sl.compress_params(params_with(jnp.asarray(np.random.RandomState(0).normal(size=(4, 6)),
                                                 jnp.float32)), sl.CompressionConfig())
  with pytest.raises(ValueError, match="needs params"):
    tx.update(p, tx.init(p))


def test_unknown_module_layout_is_named():
  import flax.linen as nn

  class MyLinear(nn.Module):
    @nn.compact
    def __call__(self, x):
      return x @ self.param("kernel", nn.initializers.normal(), (x.shape[-1], 6))

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return MyLinear(name="layers_0")(x)

  x = jnp.ones((2, 4))
  params = Net().init(np.random.RandomState(0).randint(0, 9, 2).astype(np.uint32), x)["params"]
  cp = sl.compress_params(params, sl.CompressionConfig(include="layers_0"))
  with pytest.raises(TypeError, match=r"layers_0.*MyLinear.*register_layout"):
    with sl.intercept():
      Net().apply({"params": cp}, x)
  sl.register_layout(MyLinear, "in_out")
  with sl.intercept(sl.CompressionConfig(sharpness=1e6)):
    y = Net().apply({"params": cp}, x)
  np.testing.assert_allclose(y, Net().apply({"params": params}, x), rtol=1e-5)
