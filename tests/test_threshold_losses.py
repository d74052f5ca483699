"""Soft threshold and compression losses against numpy formulas and finite differences."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import softlm_jax as sl


def np_threshold(s, alpha, k, c=0.0):
  t = np.tanh(k * (s - alpha))
  return np.where(s >= alpha, s * t, c * t)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("c", [0.0, 0.3])
def test_threshold_values(jit, c):
  s = np.linspace(-0.5, 2.0, 101).astype(np.float32)
  fn = lambda s, a: sl.soft_threshold(s, a, sharpness=7.0, floor=c)  # noqa: E731
  fn = jax.jit(fn) if jit else fn
  for alpha in (0.0, 0.37, 1.2):
    np.testing.assert_allclose(fn(s, alpha), np_threshold(s, alpha, 7.0, c), rtol=1e-5, atol=1e-6)


def test_threshold_zero_below_alpha_and_rank_matches():
  s = jnp.asarray([3.0, 2.0, 1.0, 0.5, 0.1])
  th = sl.soft_threshold(s, 0.75, sharpness=5.0)
  assert np.all(np.asarray(th)[3:] == 0) and np.all(np.asarray(th)[:3] > 0)
  layer = {"left": jnp.ones((4, 5)), "right": jnp.ones((5, 6)), "s": s, "alpha": jnp.asarray(0.75)}
  assert int(sl.effective_rank(layer)) == int(np.count_nonzero(np.asarray(th)))


def test_threshold_large_sharpness_is_identity_above_zero():
  s = jnp.asarray(np.random.RandomState(0).uniform(0.01, 3, 50), jnp.float32)
  np.testing.assert_allclose(sl.soft_threshold(s, 0.0, sharpness=1e6), s, rtol=1e-6)


@pytest.mark.parametrize("c", [0.0, 0.2])
def test_threshold_gradients_match_finite_differences(c):
  rng = np.random.RandomState(1)
  s = rng.uniform(0.05, 1.5, 40)
  alpha, k, eps = 0.6, 3.0, 1e-6
  s = s[np.abs(s - alpha) > 1e-2]  # away from the kink at s == alpha
  w = rng.normal(size=s.shape)
  with jax.enable_x64(True):
    f = lambda s_, a_: jnp.sum(w * sl.soft_threshold(s_, a_, sharpness=k, floor=c))  # noqa: E731
    gs, ga = jax.grad(f, argnums=(0, 1))(jnp.asarray(s), jnp.asarray(alpha))
    fd_s = np.array([(f(s + eps * e, alpha) - f(s - eps * e, alpha)) / (2 * eps) for e in np.eye(len(s))])
    fd_a = (f(s, alpha + eps) - f(s, alpha - eps)) / (2 * eps)
  np.testing.assert_allclose(gs, fd_s, rtol=1e-6, atol=1e-8)
  np.testing.assert_allclose(ga, fd_a, rtol=1e-6)
  # analytic: d/dalpha s*tanh(k(s-a)) = -s*k*sech^2(k(s-a)) above alpha
  above = s >= alpha
  expect = np.sum(np.where(above, -w * s * k, -w * c * k) / np.cosh(k * (s - alpha)) ** 2)
  np.testing.assert_allclose(ga, expect, rtol=1e-8)


def test_losses_values_and_gradients():
  a = jnp.asarray([0.0, 0.5, 2.0])
  np.testing.assert_allclose(sl.adaptive_loss(a), np.sum(np.exp(-np.asarray(a))), rtol=1e-6)
  np.testing.assert_allclose(sl.linear_loss(a), -2.5, rtol=1e-6)
  np.testing.assert_allclose(jax.grad(sl.adaptive_loss)(a), -np.exp(-np.asarray(a)), rtol=1e-6)
  np.testing.assert_allclose(jax.grad(sl.linear_loss)(a), -np.ones(3), rtol=1e-6)
  params = {"l0": {"left": jnp.ones((3, 2)), "right": jnp.ones((2, 3)), "s": jnp.ones(2), "alpha": a[1]},
            "l1": {"left": jnp.ones((3, 2)), "right": jnp.ones((2, 3)), "s": jnp.ones(2), "alpha": a[2]}}
  for name, fn in (("adaptive", sl.adaptive_loss), ("linear", sl.linear_loss)):
    cfg = sl.CompressionConfig(loss=name, gamma=0.3)
    np.testing.assert_allclose(sl.compression_loss(params, cfg), 0.3 * fn(a[1:]), rtol=1e-6)
