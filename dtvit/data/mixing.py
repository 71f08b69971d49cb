"""Mixup and cutmix on device: pure `jnp` functions of a global batch, for use inside the jitted train step.

Examples are mixed in pairs (0, 1), (2, 3), ... of the global batch; both members of a pair share one weight
(and, for cutmix, one box), so each takes the other's share of the pair. Every pair draws its own weight
and, when both kinds are on, its own choice between them. Shapes are static: the cutmix box is a mask, not a
slice, so the step compiles once. Mixing commutes with per-channel normalisation, so it may run on the
normalised images the pipeline delivers.
"""
import jax
import jax.numpy as jnp

_MIX_STREAM = 0x6D6978  # separates the mixing keys from other keys drawn from the run's seed


def mix_key(seed: int, step) -> jax.Array:
  """The mixing key of train step `step` (an int or a traced int32 scalar): a function of (seed, step) only,
  so a resumed run mixes every batch as the uninterrupted run did."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _MIX_STREAM), step)


def _betas(rng: jax.Array, alphas: tuple[float, ...], num: int) -> jax.Array:
  """[len(alphas), num] float32: row i ~ Beta(alphas[i], alphas[i]), as g / (g + g') for gamma variates.

  One gamma sampler for every row: it dominates the compile time of the mixing (seconds on CPU).
  """
  alpha = jnp.broadcast_to(jnp.asarray(alphas, jnp.float32)[:, None, None], (len(alphas), 2, num))
  log_gamma = jax.random.loggamma(rng, alpha)  # log space: small alphas underflow gamma variates to 0
  return jnp.clip(jnp.exp(log_gamma[:, 0] - jnp.logaddexp(log_gamma[:, 0], log_gamma[:, 1])), 0.0, 1.0)


def cutmix_boxes(rng: jax.Array, lam_P: jax.Array, height: int, width: int) -> tuple[jax.Array, jax.Array]:
  """One box per pair: sides floor(H sqrt(1 - lam)) x floor(W sqrt(1 - lam)), centre uniform over the image,
  clipped at the border.

  Returns (inside_PHW bool: pixel in the box, weight_P float32: 1 - box area / (H W), the exact share of an
  example's own pixels after the box is pasted from its partner).
  """
  num_pairs = lam_P.shape[0]
  key_y, key_x = jax.random.split(rng)
  side = jnp.sqrt(1.0 - lam_P)

  def extent(key, length):  # [start, stop) of the box along one axis, per pair
    cut = jnp.floor(length * side).astype(jnp.int32)
    centre = jax.random.randint(key, (num_pairs,), 0, length)
    start = jnp.clip(centre - cut // 2, 0, length)
    stop = jnp.clip(centre + cut - cut // 2, 0, length)
    inside = (jnp.arange(length) >= start[:, None]) & (jnp.arange(length) < stop[:, None])
    return inside, stop - start

  rows_PH, box_h_P = extent(key_y, height)
  cols_PW, box_w_P = extent(key_x, width)
  weight_P = 1.0 - (box_h_P * box_w_P).astype(jnp.float32) / (height * width)
  return rows_PH[:, :, None] & cols_PW[:, None, :], weight_P


def _own_weights(rng: jax.Array, num_pairs: int, height: int, width: int, *, mixup_alpha: float,
                 cutmix_alpha: float, switch_prob: float) -> tuple[jax.Array, jax.Array]:
  """(own_PHW: per-pixel weight of an example's own image, weight_P: the weight of its own label)."""
  key_lam, key_box, key_switch = jax.random.split(rng, 3)
  kinds = [k for k, alpha in (('mixup', mixup_alpha), ('cutmix', cutmix_alpha)) if alpha > 0]
  lam = dict(zip(kinds, _betas(key_lam, tuple(a for a in (mixup_alpha, cutmix_alpha) if a > 0), num_pairs)))
  if 'mixup' in lam:
    mix_own_PHW = jnp.broadcast_to(lam['mixup'][:, None, None], (num_pairs, height, width))
    if 'cutmix' not in lam:
      return mix_own_PHW, lam['mixup']
  inside_PHW, cut_weight_P = cutmix_boxes(key_box, lam['cutmix'], height, width)
  cut_own_PHW = (~inside_PHW).astype(jnp.float32)
  if 'mixup' not in lam:
    return cut_own_PHW, cut_weight_P
  use_cut_P = jax.random.bernoulli(key_switch, switch_prob, (num_pairs,))
  return (jnp.where(use_cut_P[:, None, None], cut_own_PHW, mix_own_PHW),
          jnp.where(use_cut_P, cut_weight_P, lam['mixup']))


def mix_batch(rng: jax.Array, images_BHWC: jax.Array, targets_BK: jax.Array, *, mixup_alpha: float,
              cutmix_alpha: float, switch_prob: float = 0.5) -> tuple[jax.Array, jax.Array]:
  """Mixup or cutmix of the pairs (2k, 2k+1) of a batch; an odd batch's last example stays as it is.

  rng: a key (e.g. `mix_key(seed, step)`). images_BHWC: float images (normalised or not). targets_BK: soft
  targets, one-hot or not. mixup_alpha / cutmix_alpha: Beta(alpha, alpha) concentration, 0 = off (Python
  floats: they choose what is compiled). switch_prob: with both on, the chance that a pair uses cutmix.

  Mixup: both members become lam * own + (1 - lam) * partner, lam ~ Beta(mixup_alpha), images and targets.
  Cutmix: lam ~ Beta(cutmix_alpha) sizes a box that both members take from their partner; the target weight
  is the pixel share actually kept, 1 - box area / (H W), after the box is clipped at the border.
  Returns (images [B, H, W, C] in the dtype of images_BHWC, targets float32 [B, K]); with both alphas 0 the
  inputs unchanged.
  """
  if mixup_alpha < 0 or cutmix_alpha < 0 or not 0.0 <= switch_prob <= 1.0:
    raise ValueError(f'mixup_alpha ({mixup_alpha}) and cutmix_alpha ({cutmix_alpha}) must be >= 0 and '
                     f'switch_prob ({switch_prob}) in [0, 1].')
  batch, height, width = images_BHWC.shape[:3]
  num_pairs = batch // 2
  if (mixup_alpha <= 0 and cutmix_alpha <= 0) or num_pairs == 0:
    return images_BHWC, targets_BK
  own_PHW, weight_P = _own_weights(rng, num_pairs, height, width, mixup_alpha=mixup_alpha,
                                   cutmix_alpha=cutmix_alpha, switch_prob=switch_prob)

  def mix(x_B, own_P):  # x: [B, ...] -> pairs [P, 2, ...]; the partner is the pair flipped
    x_P2 = x_B[:2 * num_pairs].astype(jnp.float32).reshape(num_pairs, 2, *x_B.shape[1:])
    own_P2 = own_P.reshape(num_pairs, 1, *own_P.shape[1:], *(1,) * (x_B.ndim - own_P.ndim))
    mixed_P2 = own_P2 * x_P2 + (1.0 - own_P2) * x_P2[:, ::-1]
    return jnp.concatenate([mixed_P2.reshape(2 * num_pairs, *x_B.shape[1:]),
                            x_B[2 * num_pairs:].astype(jnp.float32)])

  return mix(images_BHWC, own_PHW).astype(images_BHWC.dtype), mix(targets_BK, weight_P)


def scheduled_mix_batch(rng: jax.Array, step, images_BHWC: jax.Array, targets_BK: jax.Array, *, off_step: int,
                        mixup_alpha: float, cutmix_alpha: float,
                        switch_prob: float = 0.5) -> tuple[jax.Array, jax.Array]:
  """`mix_batch` at the train steps before `off_step`, the batch as is from `off_step` on (timm's
  `mixup_off_epoch`, counted in steps of the phase); off_step <= 0: mix at every step.

  step: the (traced) int32 step counter of the phase. The targets come back float32 either way."""
  if int(off_step) != off_step:
    raise ValueError(f'mixup_off_step must be an integer (a step of the phase; 0 = never off), got {off_step}.')
  mix = lambda: mix_batch(rng, images_BHWC, targets_BK, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha,
                          switch_prob=switch_prob)
  if off_step <= 0:
    return mix()
  keep = lambda: (images_BHWC, targets_BK.astype(jnp.float32))
  return jax.lax.cond(step < off_step, mix, keep)
