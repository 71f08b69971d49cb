"""Tests for dtvit.data.mixing: mixup and cutmix of a global batch on device."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dtvit.data import mixing

B, H, W, C, K = 64, 12, 10, 3, 7


def _batch(seed=0, batch=B):
  """Random images, and one-hot targets whose pair partners always have different labels."""
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(batch, H, W, C)).astype(np.float32)
  labels = np.arange(batch) % K
  return jnp.asarray(images), jnp.asarray(np.eye(K, dtype=np.float32)[labels]), labels


# Jitted, as in the train step (and one compile per setting rather than one per op).
_jit_mix = jax.jit(mixing.mix_batch, static_argnames=('mixup_alpha', 'cutmix_alpha', 'switch_prob'))


def _mix(images, targets, key=0, switch_prob=0.5, **alphas):
  return _jit_mix(jax.random.key(key), images, targets, switch_prob=switch_prob, **alphas)


def _own_weights(targets_out, labels):
  """Weight of each example's own label; its partner's is 1 minus it (checked by the callers)."""
  return np.asarray(targets_out)[np.arange(len(labels)), labels]


def test_alpha_zero_is_the_identity():
  images, targets, _ = _batch()
  out_images, out_targets = mixing.mix_batch(jax.random.key(0), images, targets, mixup_alpha=0.0, cutmix_alpha=0.0)
  assert out_images is images and out_targets is targets
  image, target, _ = _batch(batch=1)  # a single example has no partner
  np.testing.assert_array_equal(_mix(image, target, mixup_alpha=1.0, cutmix_alpha=1.0)[0], image)


@pytest.mark.parametrize('alphas', [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_targets_are_convex_and_pairs_share_one_weight(alphas):
  images, targets, labels = _batch()
  _, out = _mix(images, targets, mixup_alpha=alphas[0], cutmix_alpha=alphas[1])
  out = np.asarray(out)
  chex.assert_shape(out, (B, K))
  assert (out >= 0).all()
  np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-6)
  own = _own_weights(out, labels)
  partner = out[np.arange(B), labels[np.arange(B) ^ 1]]
  np.testing.assert_allclose(own + partner, 1.0, atol=1e-6)
  assert ((0 <= own) & (own <= 1)).all()
  np.testing.assert_allclose(own[0::2], own[1::2], atol=1e-6)  # both members keep the same share
  assert own.std() > 0.05  # one weight per pair, not one per batch


def test_mixup_images_use_the_target_weight():
  images, targets, labels = _batch()
  out_images, out = _mix(images, targets, mixup_alpha=0.8, cutmix_alpha=0.0)
  lam = _own_weights(out, labels)[:, None, None, None]
  partner = np.asarray(images)[np.arange(B) ^ 1]
  np.testing.assert_allclose(out_images, lam * np.asarray(images) + (1 - lam) * partner, atol=1e-5)


def test_cutmix_pastes_one_box_whose_area_is_the_partner_weight():
  images, targets, labels = _batch()
  out_images, out = _mix(images, targets, mixup_alpha=0.0, cutmix_alpha=1.0)
  x, y = np.asarray(images), np.asarray(out_images)
  partner = x[np.arange(B) ^ 1]
  own = _own_weights(out, labels)
  for b in range(B):
    from_partner = np.all(y[b] == partner[b], axis=-1)
    assert np.all(from_partner | np.all(y[b] == x[b], axis=-1))  # every pixel is one or the other, exactly
    rows, cols = np.nonzero(from_partner)
    if rows.size:  # the pasted pixels fill a rectangle
      assert (np.ptp(rows) + 1) * (np.ptp(cols) + 1) == rows.size
    np.testing.assert_allclose(1.0 - own[b], rows.size / (H * W), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(from_partner, np.all(y[b ^ 1] == x[b], axis=-1))  # the pair's one box


@pytest.mark.parametrize('switch_prob', [0.0, 0.5, 1.0])
def test_switch_prob_picks_cutmix_per_pair(switch_prob):
  images, targets, _ = _batch()
  out_images, _ = _mix(images, targets, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=switch_prob)
  x, y = np.asarray(images), np.asarray(out_images)
  # A cutmix pair holds only original pixels; a mixup pair (weight strictly inside (0, 1)) none.
  is_cut = np.array([np.all(np.all(y[b] == x[b], -1) | np.all(y[b] == x[b ^ 1], -1)) for b in range(0, B, 2)])
  expected = {0.0: (0.0, 0.0), 0.5: (0.25, 0.75), 1.0: (1.0, 1.0)}[switch_prob]
  assert expected[0] <= is_cut.mean() <= expected[1]


def test_mixup_weight_follows_beta():
  images, targets, labels = _batch(batch=4096)
  _, out = _mix(images[..., :1, :1, :], targets, mixup_alpha=0.5, cutmix_alpha=0.0)
  lam = _own_weights(out, labels)[::2]
  # Beta(0.5, 0.5): mean 1/2, variance 1/8, and U-shaped (more mass near the ends than in the middle).
  assert abs(lam.mean() - 0.5) < 0.03 and abs(lam.var() - 0.125) < 0.015
  assert np.mean(lam < 0.1) > np.mean((0.45 < lam) & (lam < 0.55)) * 2


@pytest.mark.slow
def test_odd_batch_leaves_its_last_example():
  images, targets, _ = _batch(batch=7)
  out_images, out = _mix(images, targets, mixup_alpha=1.0, cutmix_alpha=1.0)
  np.testing.assert_array_equal(out_images[-1], images[-1])
  np.testing.assert_array_equal(out[-1], targets[-1])
  assert not np.array_equal(out_images[:6], images[:6])


@pytest.mark.slow
def test_deterministic_per_step_key():
  images, targets, _ = _batch()
  fn = functools.partial(_jit_mix, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5)
  a = fn(mixing.mix_key(3, 10), images, targets)
  assert a[0].dtype == images.dtype and a[1].dtype == jnp.float32
  chex.assert_trees_all_equal(a, fn(mixing.mix_key(3, 10), images, targets))  # same key, same batch
  assert not np.array_equal(a[1], fn(mixing.mix_key(3, 11), images, targets)[1])  # the next step differs
  assert not np.array_equal(a[1], fn(mixing.mix_key(4, 10), images, targets)[1])  # another seed differs
  # Inside a step the step number is traced; its key is the key of that step (the values up to float
  # rounding, as another program may fuse the arithmetic differently).
  traced = jax.jit(lambda s: fn(mixing.mix_key(3, s), images, targets))(jnp.int32(10))
  chex.assert_trees_all_close(traced, a, atol=1e-6)


@pytest.mark.slow
def test_sharded_batch_mixes_as_one_device():
  images, targets, _ = _batch()
  mesh = jax.make_mesh((len(jax.devices()),), ('data',))
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  fn = functools.partial(_jit_mix, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5)
  key = mixing.mix_key(0, 5)
  sharded = fn(key, jax.device_put(images, spec), jax.device_put(targets, spec))
  chex.assert_trees_all_close(sharded, fn(key, images, targets), atol=1e-6)


def test_bad_settings_are_errors():
  images, targets, _ = _batch()
  with pytest.raises(ValueError, match='must be >= 0'):
    _mix(images, targets, mixup_alpha=-1.0, cutmix_alpha=0.0)
  with pytest.raises(ValueError, match=r'switch_prob \(2.0\) in \[0, 1\]'):
    _mix(images, targets, mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=2.0)


def test_mixing_switches_off_at_the_off_step():
  images, targets, _ = _batch()
  mix = jax.jit(functools.partial(mixing.scheduled_mix_batch, off_step=5, mixup_alpha=0.5, cutmix_alpha=0.0))
  key = jax.random.key(3)
  before = mix(key, jnp.int32(4), images, targets)
  expected = _mix(images, targets, key=3, mixup_alpha=0.5, cutmix_alpha=0.0)
  for got, want in zip(before, expected):  # before the off step: exactly mix_batch with the same key
    np.testing.assert_array_equal(got, want)
  assert not np.array_equal(before[0], images)
  for step in (5, 6, 10_000):  # from the off step on: the batch as is
    out_images, out_targets = mix(key, jnp.int32(step), images, targets)
    np.testing.assert_array_equal(out_images, images)
    np.testing.assert_array_equal(out_targets, targets)
  always = functools.partial(mixing.scheduled_mix_batch, off_step=0, mixup_alpha=0.5, cutmix_alpha=0.0)
  late = always(key, jnp.int32(10_000), images, targets)[0]  # off_step 0: never off
  np.testing.assert_array_equal(late, expected[0])
  with pytest.raises(ValueError, match='mixup_off_step must be an integer'):
    mixing.scheduled_mix_batch(key, 0, images, targets, off_step=2.5, mixup_alpha=0.5, cutmix_alpha=0.0)
