"""Time-step masks: exact binary forward, sigmoid' backward, monotone form, costs and averages."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dtvit import masks

SCORES = jnp.array([2.0, -0.5, 0.3, -1.2, 0.7])


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_ste_forward_is_exactly_binary_and_backward_is_sigmoid_prime(temperature):
  m = masks.time_step_mask(SCORES, mode="ste", temperature=temperature)
  np.testing.assert_array_equal(np.asarray(m), [1, 0, 1, 0, 1])
  assert set(np.unique(np.asarray(m)).tolist()) <= {0.0, 1.0}
  weights = jnp.arange(1.0, 6.0)
  grad = jax.grad(lambda s: jnp.sum(weights * masks.time_step_mask(s, mode="ste", temperature=temperature)))(SCORES)
  sig = jax.nn.sigmoid(SCORES / temperature)
  np.testing.assert_allclose(grad, weights * sig * (1 - sig) / temperature, rtol=1e-6)


def test_ste_forward_binary_for_many_random_scores():
  s = jax.random.normal(jax.random.key(0), (10000,)) * 5
  m = np.asarray(masks.time_step_mask(s))
  assert set(np.unique(m).tolist()) == {0.0, 1.0}
  np.testing.assert_array_equal(m, np.asarray(s) > 0)


def test_sigmoid_mode_anneals_towards_hard_step():
  gaps = [float(jnp.max(jnp.abs(masks.time_step_mask(SCORES, mode="sigmoid", temperature=t)
                                - masks.hard_mask(SCORES)))) for t in (1.0, 0.1, 0.01)]
  assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 1e-6 + jax.nn.sigmoid(-30.0)


@pytest.mark.parametrize("mode", masks.MASK_MODES)
def test_monotone_mask_stays_off_once_off(mode):
  m = np.asarray(masks.time_step_mask(SCORES * 10, mode=mode, monotone=True))
  assert np.all(np.diff(m) <= 1e-6)
  np.testing.assert_array_equal(np.asarray(masks.hard_mask(SCORES, monotone=True)), [1, 0, 0, 0, 0])
  # Gradients still reach the later scores through the product in STE mode.
  if mode == "ste":
    g = jax.grad(lambda s: jnp.sum(masks.time_step_mask(s, monotone=True)))(jnp.array([1.0, 2.0, 3.0]))
    assert np.all(np.asarray(g) > 0)


def test_costs_and_averages():
  scores = {"a": jnp.array([3.0, -3.0]), "b": jnp.array([0.0, 0.0])}
  sig = jax.nn.sigmoid
  expected = ((sig(3.0) + sig(-3.0)) + 1.0) / 2
  assert float(masks.time_step_cost(scores)) == pytest.approx(float(expected), rel=1e-6)
  w = {"a": 3.0, "b": 1.0}
  ow = (3 * (sig(3.0) + sig(-3.0)) + 1.0) / 4
  assert float(masks.time_step_cost(scores, kind="op_weighted", op_weights=w)) == pytest.approx(float(ow), 1e-6)
  assert float(masks.time_step_cost(scores, kind="hinge", target=0.5)) == pytest.approx(float(expected) - 0.5, 1e-6)
  assert float(masks.time_step_cost(scores, kind="hinge", target=5.0)) == 0.0
  # The cost grows with every score, so descent pulls every score down.
  g = jax.grad(lambda s: masks.time_step_cost(s))(scores)
  assert all(np.all(np.asarray(v) > 0) for v in g.values())
  hard = {k: masks.hard_mask(v) for k, v in {"a": jnp.array([1.0, 1.0, -1.0]), "b": jnp.array([1.0, -1, -1])}.items()}
  counts = masks.step_counts(hard, {"a": (masks.OUTPUT,), "b": (masks.OUTPUT,)}, "skip")
  assert [counts[k]["active_steps"] for k in "ab"] == [2.0, 1.0]


def test_bad_arguments():
  with pytest.raises(ValueError, match="Unknown mask mode 'gumbel'"):
    masks.time_step_mask(SCORES, mode="gumbel")
  with pytest.raises(ValueError, match="Unknown time-step cost 'l1'"):
    masks.time_step_cost({"a": SCORES}, kind="l1")
  with pytest.raises(ValueError, match="needs a target"):
    masks.time_step_cost({"a": SCORES}, kind="hinge")
  with pytest.raises(ValueError, match="missing: \\['a'\\]"):
    masks.time_step_cost({"a": SCORES}, kind="op_weighted", op_weights={})


def test_the_cost_counts_the_steps_each_semantics_costs():
  s = jnp.array([-30.0, 30.0, -30.0, -30.0])  # hard: only step 1 on
  assert float(masks.expected_steps(s, semantics="skip")) == pytest.approx(1.0, abs=1e-6)
  assert float(masks.expected_steps(s, semantics="filter")) == pytest.approx(2.0, abs=1e-6)  # steps 0 and 1
  # Soft: 'filter' counts P(some step at or after t is on) = 1 - prod_{k >= t} (1 - p[k]).
  p = np.array([0.2, 0.7, 0.1, 0.4])
  sc = jnp.asarray(np.log(p / (1 - p)), jnp.float32)
  want = sum(1 - np.prod(1 - p[t:]) for t in range(4))
  assert float(masks.expected_steps(sc, semantics="filter")) == pytest.approx(want, rel=1e-5)
  assert float(masks.time_step_cost({"a": sc}, semantics="filter")) == pytest.approx(want, rel=1e-5)
  # Moving an active step earlier lowers the 'filter' cost, not the 'skip' cost.
  late, early = jnp.array([-9.0, -9.0, -9.0, 9.0]), jnp.array([9.0, -9.0, -9.0, -9.0])
  assert float(masks.expected_steps(early, semantics="filter")) < float(masks.expected_steps(late, semantics="filter"))
  assert float(masks.expected_steps(early)) == pytest.approx(float(masks.expected_steps(late)), rel=1e-6)
  with pytest.raises(ValueError, match="semantics"):
    masks.expected_steps(s, semantics="drop")
