"""The train split resident in device memory (`data.placement='device'`): the host sends only record indices.

For datasets that fit on every device (digits, CIFAR-10/100: 150 MB as uint8), the whole train split is
uploaded once, replicated, in its stored dtype (after the one deterministic resize to the model's side that the
host pipeline also applies). The host sends the record indices of `CHUNK` steps at once (int32 [GB, CHUNK],
sharded over 'data'; the same array serves those steps, so nothing is transferred at the others), and the
jitted step itself takes its column, gathers the records, applies the random crop of the zero-padded image
(`data.augment.crop_padding`) and the horizontal flip, normalises and one-hot encodes; mixup and cutmix follow
as on the host path (`mixing.py`). The host's work per step is a numpy slice of an epoch permutation, so the
input pipeline no longer competes with the step for the host's cores, and an accelerator never waits for it.

What it supports: fixed-size images and the augmentations crop_padding, flip, mixup and cutmix. RandAugment,
random erasing and the random resized crop are ops on the host (`augment.py`): such configs keep
`data.placement='host'`.

Order and randomness: epoch e visits the train split in the order `np.random.default_rng([seed, e])
.permutation(N)`, and global batch s holds stream positions s*GB .. s*GB + GB - 1; process p reads the
contiguous slice [p*B, (p+1)*B) of each global batch. An example's crop and flip are drawn from
(seed, step, position in the global batch) on device. A batch is thus a function of (seed, step) alone, the
same for any number of devices or processes, and a resumed run reads and augments exactly what the
uninterrupted one did. Both differ from the host pipeline's draws (grain's shuffle, numpy augmentation
seeds): the two placements train on equally distributed, not identical, batches.
"""
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from dtvit.data import augment
from dtvit.data import sources

PLACEMENTS = ('host', 'device')
MAX_BYTES = 8 * 2**30  # the train split is replicated on every device: larger ones stay on the host
_AUG_STREAM = 0x617567  # separates the crop / flip keys from other keys drawn from the run's seed
HOST_ONLY_AUGMENTS = ('randaugment_ops', 'random_resized_crop', 'random_erasing')  # host ops in augment.py
CHUNK = 32  # steps whose record indices travel to the devices together
TABLE_KEYS = ('table_image', 'table_label')  # the resident arrays, passed to the step beside 'index'


def check(data_cfg, ds: sources.Dataset | None = None) -> None:
  """Raises a ValueError naming the setting when `data.placement='device'` cannot serve `data_cfg`."""
  placement = data_cfg.get('placement', 'host')
  if placement not in PLACEMENTS:
    raise ValueError(f"data.placement={placement!r}; choose 'host' (grain pipeline) or 'device' (train split "
                     f"resident in device memory).")
  if placement != 'device':
    return
  aug = data_cfg.augment
  host_only = [f'augment.{k}={aug[k]}' for k in HOST_ONLY_AUGMENTS if aug.get(k)]
  if host_only:
    raise ValueError(f"data.placement='device' augments with crops, flips, mixup and cutmix only; "
                     f"data.{', data.'.join(host_only)} needs the host pipeline: set data.placement=host "
                     f"(or turn those augmentations off).")
  ds = ds or sources.load(data_cfg)
  if ds.variable_size:
    raise ValueError(f"data.placement='device' needs images of one size; {data_cfg.name} stores images of "
                     f"varying sizes: set data.placement=host.")
  nbytes = table_bytes(ds)
  if nbytes > MAX_BYTES:
    raise ValueError(f"data.placement='device' would hold {nbytes / 2**30:.1f} GiB of train images on every "
                     f"device (limit {MAX_BYTES / 2**30:.0f} GiB): set data.placement=host.")


def table_bytes(ds: sources.Dataset) -> int:
  first = ds.splits['train'][0]['image']
  return int(np.prod(ds.info.image_shape)) * first.dtype.itemsize * ds.info.num_train


def load_table(data_cfg) -> dict[str, np.ndarray]:
  """The whole train split (after `data.val_examples` are held out) as {'table_image': [N, H, W, C] in the
  stored dtype (uint8, or float32 in [0, 1]), 'table_label': int32 [N]}, resized to the model's side."""
  ds = sources.load(data_cfg)
  check(data_cfg, ds)
  size = ds.info.image_shape[0]
  records = ds.splits['train'].__getitems__(list(range(ds.info.num_train)))
  image = np.stack([augment.fit_size(r['image'], size, method=data_cfg.resize_method) for r in records])
  return {'table_image': image, 'table_label': np.asarray([r['label'] for r in records], np.int32)}


class _Epochs:
  """Stream position -> record index; the permutation of the current epoch is kept."""

  def __init__(self, num_examples: int, seed: int):
    self.num_examples, self.seed = num_examples, seed
    self._epoch, self._order = -1, None

  def order(self, epoch: int) -> np.ndarray:
    if epoch != self._epoch:
      self._epoch = epoch
      self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples).astype(np.int32)
    return self._order

  def take(self, start: int, count: int) -> np.ndarray:
    """Records of stream positions [start, start + count), across epoch boundaries."""
    parts, position = [], start
    while position < start + count:
      epoch, offset = divmod(position, self.num_examples)
      n = min(self.num_examples - offset, start + count - position)
      parts.append(self.order(epoch)[offset:offset + n])
      position += n
    return np.concatenate(parts)


def index_batches(num_examples: int, *, global_batch_size: int, seed: int, start_step: int = 0,
                  process_index: int = 0, process_count: int = 1, chunk: int = CHUNK) -> Iterator[dict]:
  """Endless, one element per step from `start_step` on: {'index': int32 [B, chunk]}, this process's record
  indices of the global batches of the steps c*chunk .. c*chunk + chunk-1 (column j: step c*chunk + j) for the
  chunk c holding the step; the same array object for every step of a chunk (B = global_batch_size /
  process_count; see the module docstring for the order). `make_fetch` takes the step's column."""
  if seed < 0 or start_step < 0:
    raise ValueError(f'seed ({seed}) and start_step ({start_step}) must be non-negative.')
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f'global_batch_size={global_batch_size} is not a positive multiple of process_count='
                     f'{process_count}.')
  local = global_batch_size // process_count
  epochs = _Epochs(num_examples, seed)
  step = start_step
  while True:
    first = step - step % chunk
    columns = [epochs.take(s * global_batch_size + process_index * local, local) for s in range(first, first + chunk)]
    batch = {'index': np.stack(columns, axis=1)}
    for _ in range(first + chunk - step):
      yield batch
    step = first + chunk


def shift_flip(image_BHWC: jax.Array, dy_B: jax.Array, dx_B: jax.Array, flip_B: jax.Array) -> jax.Array:
  """Per example: out[y, x] = image[y + dy, x + dx], zero outside (`augment.shift`), then mirrored where
  flip_B. Offsets are int32 in [-pad, pad]; one gather of the zero-padded batch, static shapes."""
  _, height, width, _ = image_BHWC.shape
  rows_BH = jnp.arange(height)[None, :] + dy_B[:, None]
  cols_BW = jnp.arange(width)[None, :] + dx_B[:, None]
  cols_BW = jnp.where(flip_B[:, None], cols_BW[:, ::-1], cols_BW)
  inside_BHW = (((rows_BH >= 0) & (rows_BH < height))[:, :, None]
                & ((cols_BW >= 0) & (cols_BW < width))[:, None, :])
  rows_BH, cols_BW = jnp.clip(rows_BH, 0, height - 1), jnp.clip(cols_BW, 0, width - 1)
  batch_B = jnp.arange(image_BHWC.shape[0])
  out = image_BHWC[batch_B[:, None, None], rows_BH[:, :, None], cols_BW[:, None, :]]
  return jnp.where(inside_BHW[..., None], out, jnp.zeros((), out.dtype))


def augment_key(seed: int, step) -> jax.Array:
  """The crop / flip key of train step `step` (int or traced int32): a function of (seed, step) only."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _AUG_STREAM), step)


def draw_shift_flip(key: jax.Array, batch_size: int, *, padding: int, flip: bool):
  """(dy_B, dx_B, flip_B) for a global batch: offsets uniform in [-padding, padding], flips with p = 1/2."""
  key_shift, key_flip = jax.random.split(key)
  d_B2 = jax.random.randint(key_shift, (batch_size, 2), -padding, padding + 1, jnp.int32)
  flip_B = jax.random.bernoulli(key_flip, 0.5, (batch_size,)) if flip else jnp.zeros((batch_size,), bool)
  return d_B2[:, 0], d_B2[:, 1], flip_B


def make_fetch(data_cfg, *, seed: int, num_classes: int):
  """(step, batch) -> batch, for the train step's `augment_fn`: the batch {'index' [B, chunk] (`index_batches`),
  'table_image', 'table_label'} becomes {'image' normalised float32 [B, H, W, C], 'label', 'target' one-hot}."""
  aug = data_cfg.augment
  ds = sources.load(data_cfg)
  mean_C, std_C = jnp.asarray(ds.mean, jnp.float32), jnp.asarray(ds.std, jnp.float32)

  def fetch(step, batch):
    index_B = jax.lax.dynamic_index_in_dim(batch['index'], step % batch['index'].shape[1], axis=1, keepdims=False)
    image = batch['table_image'][index_B]
    image = image.astype(jnp.float32) / 255.0 if image.dtype == jnp.uint8 else image.astype(jnp.float32)
    if aug.crop_padding > 0 or aug.flip:
      dy_B, dx_B, flip_B = draw_shift_flip(augment_key(seed, step), index_B.shape[0], padding=aug.crop_padding,
                                           flip=aug.flip)
      image = shift_flip(image, dy_B, dx_B, flip_B)
    label = batch['table_label'][index_B]
    return {'image': (image - mean_C) / std_C, 'label': label,
            'target': jax.nn.one_hot(label, num_classes, dtype=jnp.float32)}

  return fetch
