"""Batches on grain: deterministic, resumable numpy batches for training and evaluation.

The train stream, a `grain.MapDataset` (random access, so nothing is replayed to resume):
  range(N) -> .seed(seed) -> .shuffle() -> .repeat() -> .random_map(draw a seed) -> .batch(B) -> [p::P]
  -> [start_step:] -> .map(read the batch's records, augment each with its seed, normalise, one-hot)
Epoch e of the stream is grain's permutation of the train set for (seed, e) (`repeat` reseeds every epoch);
stream position q = s * GB + i holds the i-th example of global batch s. `random_map` gives the element at q
an augmentation seed from grain's rng for (seed, q), so an example's augmentation depends on neither the
batch size nor the process that reads it. Batching the stream by the local size B = GB / P makes global
batch s the local batches s*P .. s*P + P-1; process p keeps every P-th of them from p: the contiguous slice
[p*B, (p+1)*B) of each global batch. So a batch depends only on (seed, step, process):
`train_batches(start_step=k)` resumes exactly, and the P local batches side by side are the batch one process
would see. The stream carries record indices and seeds rather than records so that a batch's records are
read in one call (ArrayRecord reads them in parallel; one by one is about 4x slower). Batches are prepared
ahead in grain's background threads (`data.num_threads`, `data.prefetch`), in order.

Train batches carry one-hot targets; mixup/cutmix mix pairs of the global batch on device, inside the jitted
train step (`dtvit.data.mixing.mix_batch`). Label smoothing belongs to the loss.
"""
import functools
from typing import Iterator

import grain
import jax
import ml_collections
import numpy as np

from dtvit.data import augment
from dtvit.data import sources


def default_data_config() -> ml_collections.ConfigDict:
  """All `config.data` fields with defaults (the digits quickstart); recipes override what they need."""
  c = ml_collections.ConfigDict()
  c.name = 'digits'          # one of sources.NAMES
  c.archive = ''             # cifar10_local / image_folder: .tar.gz/.tar or folder with train/<class>/, test/<class>/
  c.data_dir = ''            # tfds data_dir for prepared data; '' = $TFDS_DATA_DIR or ~/tensorflow_datasets
  c.image_size = 0           # side of the images the model sees; 0 = native (8 digits, 32 CIFAR, 224 ImageNet)
  c.resize_method = 'bilinear'  # 'bilinear' | 'nearest' | 'bicubic': every resize (crops, image_size changes)
  c.eval_crop_pct = augment.IMAGENET_CROP_FRACTION  # variable-size eval: central crop of this x the shorter side
  c.mean = ()                # per-channel mean override in [0, 1] units; () = the dataset's own statistics
  c.std = ()                 # per-channel std override; () = the dataset's own statistics
  c.val_examples = 0         # train examples held out (fixed choice, `sources.val_indices`) as the 'val' split
  c.periodic_eval_split = 'val'  # what `<phase>.eval_every` evaluates: 'val' | 'test' (the end's test split)
  c.placement = 'host'       # 'host': grain pipeline; 'device': train split resident on device (resident.py)
  c.num_threads = 2          # grain threads preparing batches; 0 = prepare in the consuming thread
  c.prefetch = 4             # batches prepared ahead of use (with num_threads > 0)
  c.augment = ml_collections.ConfigDict()
  c.augment.crop_padding = 1           # random crop after zero padding by this many pixels (CIFAR: 4); 0 = off
  c.augment.flip = False               # random horizontal flip (off for digits: mirrored digits are other glyphs)
  c.augment.random_resized_crop = False  # Inception-style crop (ImageNet: True): area fraction in
  c.augment.rrc_min_scale = 0.08         # [rrc_min_scale, rrc_max_scale], aspect w/h log-uniform in
  c.augment.rrc_max_scale = 1.0          # [rrc_min_ratio, rrc_max_ratio]
  c.augment.rrc_min_ratio = 3 / 4
  c.augment.rrc_max_ratio = 4 / 3
  c.augment.randaugment_ops = 0        # RandAugment ops per image; 0 = off
  c.augment.randaugment_magnitude = 9  # RandAugment magnitude, 0..10
  c.augment.randaugment_op_set = 'dtvit'  # 'dtvit' (14 ops) | 'spikformer_official' (the official SNN set of 5)
  c.augment.randaugment_prob = 1.0     # probability that each drawn op is applied
  c.augment.randaugment_magnitude_std = 0.0  # magnitude ~ N(magnitude, std), clipped to [0, 10]
  c.augment.random_erasing = 0.0       # probability of blanking one random box to the mean (timm 'const'); 0 = off
  c.augment.mixup_alpha = 0.0          # Beta(alpha, alpha) mixup, on device (mixing.py); 0 = off
  c.augment.cutmix_alpha = 0.0         # Beta(alpha, alpha) cutmix, on device; 0 = off. Both on: each pair picks one
  return c


def _crop_pct(data_cfg) -> float:
  crop_pct = float(data_cfg.get('eval_crop_pct', augment.IMAGENET_CROP_FRACTION))
  if not 0 < crop_pct <= 1:
    raise ValueError(f'data.eval_crop_pct must be in (0, 1], got {crop_pct}.')
  return crop_pct


def _processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not 0 <= index < count:
    raise ValueError(f'process_index={index} is outside [0, process_count={count}).')
  return index, count


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f'global_batch_size={global_batch_size} is not a positive multiple of process_count='
                     f'{process_count}; set the batch size to a multiple of {process_count} '
                     f'(e.g. {process_count * max(1, global_batch_size // process_count)}).')
  return global_batch_size // process_count


def _example_seed(index: int, rng: np.random.Generator) -> dict:
  """A stream element: its record index and its augmentation seed, drawn from grain's rng for the element
  (seeded by the pipeline seed and the stream position)."""
  return {'index': np.int64(index), 'seed': rng.integers(2**63, dtype=np.int64)}


def _read(split, index_B: np.ndarray) -> list[dict]:
  """The records of one batch in one call: ArrayRecord sources read them in parallel."""
  return split.__getitems__(index_B.tolist())


def _labelled(images: list[np.ndarray], labels: list, mask_B: np.ndarray, *, ds: sources.Dataset,
              num_classes: int) -> dict:
  """[0, 1] images of the mask_B > 0 positions (a prefix) -> the batch dict; the rest stays zero."""
  image = np.zeros((len(mask_B), *ds.info.image_shape), np.float32)
  label = np.zeros((len(mask_B),), np.int32)
  if images:
    image[:len(images)] = augment.normalise(np.stack(images), ds.mean, ds.std)
    label[:len(labels)] = labels
  target = np.eye(num_classes, dtype=np.float32)[label] * mask_B[:, None]
  return {'image': image, 'label': label, 'target': target}


def _train_batch(elements: dict, *, ds: sources.Dataset, aug, method: str, num_classes: int,
                 crop_pct: float = augment.IMAGENET_CROP_FRACTION) -> dict:
  records = _read(ds.splits['train'], elements['index'])
  images = [augment.train_example(r['image'], np.random.default_rng(seed), size=ds.info.image_shape[0], aug=aug,
                                  method=method, variable_size=ds.variable_size, mean=ds.mean,
                                  eval_crop_pct=crop_pct)
            for r, seed in zip(records, elements['seed'].tolist())]
  mask_B = np.ones((len(records),), np.float32)
  return _labelled(images, [r['label'] for r in records], mask_B, ds=ds, num_classes=num_classes)


def _eval_batch(index_B: np.ndarray, *, split, ds: sources.Dataset, method: str, num_classes: int,
                crop_pct: float = augment.IMAGENET_CROP_FRACTION) -> dict:
  """index_B: record indices, -1 for padding past the end of the split (a suffix)."""
  mask_B = (index_B >= 0).astype(np.float32)
  records = _read(split, index_B[index_B >= 0])
  images = [augment.eval_example(r['image'], size=ds.info.image_shape[0], method=method,
                                 variable_size=ds.variable_size, crop_pct=crop_pct) for r in records]
  batch = _labelled(images, [r['label'] for r in records], mask_B, ds=ds, num_classes=num_classes)
  return dict(batch, mask=mask_B)


def _iterate(batches: grain.MapDataset, data_cfg) -> Iterator[dict]:
  """The batches in order; prepared ahead by grain's threads when data.num_threads > 0."""
  if data_cfg.num_threads <= 0:
    options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
  else:
    options = grain.ReadOptions(num_threads=data_cfg.num_threads, prefetch_buffer_size=max(1, data_cfg.prefetch))
  return iter(batches.to_iter_dataset(options))


def train_dataset(data_cfg, *, global_batch_size: int, seed: int, start_step: int = 0,
                  num_classes: int | None = None, process_index: int | None = None,
                  process_count: int | None = None) -> grain.MapDataset:
  """This process's train batches from global step `start_step` on, as an endless `grain.MapDataset`
  (element j is step start_step + j; see `train_batches`)."""
  if seed < 0 or start_step < 0:
    raise ValueError(f'seed ({seed}) and start_step ({start_step}) must be non-negative.')
  process_index, process_count = _processes(process_index, process_count)
  local_batch_size = _local_batch_size(global_batch_size, process_count)
  ds = sources.load(data_cfg)
  aug = ml_collections.FrozenConfigDict(data_cfg.augment)  # batches prepared ahead must not see later edits
  augment.check_op_set(aug.get('randaugment_op_set', 'dtvit'))
  stream = grain.MapDataset.range(len(ds.splits['train'])).seed(seed).shuffle().repeat().random_map(_example_seed)
  batches = stream.batch(local_batch_size)[process_index::process_count][start_step:]
  return batches.map(functools.partial(_train_batch, ds=ds, aug=aug, method=data_cfg.resize_method,
                                       num_classes=num_classes or ds.info.num_classes, crop_pct=_crop_pct(data_cfg)))


def train_batches(data_cfg, *, global_batch_size: int, seed: int, start_step: int = 0,
                  num_classes: int | None = None, process_index: int | None = None,
                  process_count: int | None = None) -> Iterator[dict]:
  """Endless augmented train batches for this process, starting at global step `start_step`.

  Yields {'image': float32 [B, H, W, C] normalised, 'label': int32 [B], 'target': float32 [B, num_classes]
  one-hot}, B = global_batch_size / process_count. num_classes: width of 'target' (default: the dataset's).
  seed: a non-negative int. Mixup/cutmix are not applied here: the train step calls `mixing.mix_batch`.
  """
  dataset = train_dataset(data_cfg, global_batch_size=global_batch_size, seed=seed, start_step=start_step,
                          num_classes=num_classes, process_index=process_index, process_count=process_count)
  return _iterate(dataset, data_cfg)


def eval_dataset(data_cfg, *, split: str = 'test', global_batch_size: int, num_classes: int | None = None,
                 process_index: int | None = None, process_count: int | None = None,
                 max_examples: int = 0) -> grain.MapDataset:
  """This process's eval batches as a `grain.MapDataset` (see `eval_batches`)."""
  process_index, process_count = _processes(process_index, process_count)
  local_batch_size = _local_batch_size(global_batch_size, process_count)
  ds = sources.load(data_cfg)
  split = 'test' if split == 'validation' else split
  if split == 'val' and 'val' not in ds.splits:
    raise ValueError("split='val' needs held-out train examples: set data.val_examples > 0.")
  if split not in ds.splits:
    raise ValueError(f"split='{split}'; valid choices: train, test, val.")
  if max_examples < 0:
    raise ValueError(f'max_examples must be >= 0 (0 = the whole split), got {max_examples}.')
  total = len(ds.splits[split])
  num_examples = min(max_examples, total) if max_examples else total
  stride = total // num_examples if num_examples else 1
  num_padding = -num_examples % global_batch_size  # every process gets the same number of batches
  indices = grain.MapDataset.range(total)[::stride][:num_examples]
  if num_padding:
    indices = grain.MapDataset.concatenate([indices, grain.MapDataset.range(num_padding).map(lambda _: -1)])
  batches = indices.batch(local_batch_size)[process_index::process_count]
  return batches.map(functools.partial(_eval_batch, split=ds.splits[split], ds=ds, method=data_cfg.resize_method,
                                       num_classes=num_classes or ds.info.num_classes, crop_pct=_crop_pct(data_cfg)))


def eval_batches(data_cfg, *, split: str = 'test', global_batch_size: int, num_classes: int | None = None,
                 process_index: int | None = None, process_count: int | None = None,
                 max_examples: int = 0) -> Iterator[dict]:
  """One pass over `split` ('test', 'train' or 'val': the `data.val_examples` held out from train; 'train' is
  then without them), no augmentation, in stored order.

  `max_examples` > 0 evaluates an evenly strided subset of that size (every k-th example, so a split stored
  class by class stays balanced); 0 = the whole split.

  Yields {'image', 'label', 'target', 'mask'}. Every process yields the same number of batches,
  ceil(N / global_batch_size); positions past the end are padding: zero image, label 0, zero target, and
  'mask' float32 [B] is 0 there and 1 for real examples.
  """
  dataset = eval_dataset(data_cfg, split=split, global_batch_size=global_batch_size, num_classes=num_classes,
                         process_index=process_index, process_count=process_count, max_examples=max_examples)
  return _iterate(dataset, data_cfg)
