"""Input pipeline: deterministic, resumable numpy batches for training and evaluation.

Sources, chosen by `config.data.name`:
  digits         scikit-learn's bundled `load_digits()` (1797 real 8x8 digits), split once (stratified, seed 0)
                 into 1437 train / 360 test. In memory; the quickstart default.
  cifar10_local  a CIFAR-style folder or .tar.gz (`train/<class>/*.jpg`, `test/<class>/*.jpg`, 32x32) given by
                 `data.archive`, prepared once into `data.data_dir` as ArrayRecord by `dtvit.datasets` and read
                 with random access. The real copy lives at ../shared/data/cifar10-jpg.tar.gz (about 22 s to
                 prepare on 2 cores, ~170 MB). Normalised with the CIFAR-10 statistics.
  image_folder   the same layout with any image size: stored resized to `data.image_size` (0 = the side of the
                 first train image); mean/std estimated from up to 5000 train images unless given.
  cifar10, cifar100, imagenet2012
                 stock tfds builders, only if already prepared in `data.data_dir` with
                 `--file_format=array_record` (nothing can be downloaded here; the error says what to do).
                 ImageNet's eval split is 'validation' (asked for as 'test' too).

What needs TensorFlow: nothing on these paths. Preparing `cifar10_local`/`image_folder` writes `Tensor(uint8)`
features to ArrayRecord (TF-free), and `tfds.data_source` reads ArrayRecord without TF, decoding the stock
builders' `Image` features with PIL. TensorFlow is needed only for what this module does not do: preparing the
stock builders (`tfds build`, which encodes `tfds.features.Image`), TFRecord files, `tfds.load`/`as_dataset`/
`as_numpy`, and `tfds.folder_dataset.ImageFolder`.

The batch stream. Train example positions form an endless stream: epoch e is a permutation of the train set
drawn from (seed, e); global batch s covers stream positions [s*GB, (s+1)*GB), and process p takes the
contiguous slice [p*GB/P, (p+1)*GB/P) of it. Augmentation of the example at position g of batch s draws from
an rng seeded by (seed, s, g); mixup/cutmix mixes positions 2k and 2k+1 of the global batch with parameters
from (seed, s, 2k), a process loading the partner of its edge example itself when the pair straddles two
processes. So a batch depends only on (seed, step, process slice): `train_batches(start_step=k)` resumes
exactly, and the P local batches put side by side are the batch a single process would see. Batches are
prepared ahead of use in background threads (grain), in order.

Order of train preprocessing, per example: [random resized crop | resize to data.image_size] -> RandAugment
(uint8 PIL ops) -> random crop of the zero-padded image -> horizontal flip -> per-channel normalisation;
then per pair mixup/cutmix, which gives the soft 'target'. Label smoothing belongs to the loss, not here.
"""
import dataclasses
import functools
import sys
from typing import Callable, Iterator, Sequence

import grain
import jax
import ml_collections
import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from dtvit import datasets

NAMES = ('digits', 'cifar10_local', 'image_folder', 'cifar10', 'cifar100', 'imagenet2012')
_CIFAR10_MEAN, _CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
_CIFAR100_MEAN, _CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_IMAGENET_CROP_FRACTION = 0.875  # eval: central crop of 87.5% of the shorter side, then resize
_FOLDER_STATS_IMAGES = 5000
# Stream tags: separate rng streams for epoch permutations, per-example augmentation and pair mixing.
_PERMUTE, _AUGMENT, _MIX = 0, 1, 2


def default_data_config() -> ml_collections.ConfigDict:
  """All `config.data` fields with defaults (the digits quickstart); recipes override what they need."""
  c = ml_collections.ConfigDict()
  c.name = 'digits'          # one of NAMES
  c.archive = ''             # cifar10_local / image_folder: .tar.gz/.tar or folder with train/<class>/, test/<class>/
  c.data_dir = ''            # tfds data_dir for prepared data; '' = $TFDS_DATA_DIR or ~/tensorflow_datasets
  c.image_size = 0           # side of the images the model sees; 0 = native (8 digits, 32 CIFAR, 224 ImageNet)
  c.resize_method = 'bilinear'  # 'bilinear' | 'nearest', used when image_size differs from the stored side
  c.mean = ()                # per-channel mean override in [0, 1] units; () = the dataset's own statistics
  c.std = ()                 # per-channel std override; () = the dataset's own statistics
  c.num_threads = 2          # background threads preparing batches; 0 = prepare in the consuming thread
  c.prefetch = 4             # batches prepared ahead of use (with num_threads > 0)
  c.augment = ml_collections.ConfigDict()
  c.augment.crop_padding = 1           # random crop after zero padding by this many pixels (CIFAR: 4); 0 = off
  c.augment.flip = False               # random horizontal flip (off for digits: mirrored digits are other glyphs)
  c.augment.random_resized_crop = False  # Inception-style crop of scale [rrc_min_scale, 1] (ImageNet: True)
  c.augment.rrc_min_scale = 0.08
  c.augment.randaugment_ops = 0        # RandAugment ops per image; 0 = off
  c.augment.randaugment_magnitude = 9  # RandAugment magnitude, 0..10
  c.augment.mixup_alpha = 0.0          # Beta(alpha, alpha) mixup; 0 = off
  c.augment.cutmix_alpha = 0.0         # Beta(alpha, alpha) cutmix; 0 = off. Both on: each pair picks one at random
  return c


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  name: str
  num_classes: int
  image_shape: tuple  # (H, W, C) after preprocessing
  num_train: int
  num_test: int


@dataclasses.dataclass(frozen=True)
class _Dataset:
  """A loaded dataset: random-access splits of {'image', 'label'} records plus how to preprocess them."""
  info: DatasetInfo
  splits: dict  # 'train' / 'test' -> source with __len__ and __getitems__(indices) -> list of records
  mean: np.ndarray  # float32 [C]
  std: np.ndarray  # float32 [C]
  variable_size: bool  # stored images differ in size (ImageNet): crop/resize each to image_size


class _ArraySource:
  """In-memory records with the `__getitems__` interface of tfds data sources."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self.images, self.labels = images, labels

  def __len__(self) -> int:
    return len(self.labels)

  def __getitems__(self, indices: Sequence[int]) -> list[dict]:
    return [{'image': self.images[i], 'label': self.labels[i]} for i in indices]


def _resize(image: np.ndarray, size: int, method: str) -> np.ndarray:
  """[H, W, C] uint8 or float32 -> [size, size, C], same dtype."""
  resample = {'bilinear': Image.BILINEAR, 'nearest': Image.NEAREST}[method]
  if image.dtype == np.uint8:
    img = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    return np.asarray(img.resize((size, size), resample)).reshape(size, size, image.shape[-1])
  # Float images resize channel by channel in PIL's 32-bit float mode, keeping full precision.
  channels = [np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c], np.float32)).resize((size, size), resample))
              for c in range(image.shape[-1])]
  return np.stack(channels, axis=-1)


@functools.lru_cache(maxsize=None)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(train images float32 [1437, 8, 8, 1] in [0, 1], train labels, test images [360, 8, 8, 1], test labels)."""
  from sklearn import datasets as sk_datasets, model_selection  # only the digits source needs scikit-learn
  digits = sk_datasets.load_digits()
  images = (digits.images / 16.0).astype(np.float32)[..., None]  # pixel values are counts 0..16
  labels = digits.target.astype(np.int32)
  x_tr, x_te, y_tr, y_te = model_selection.train_test_split(
      images, labels, test_size=360, stratify=labels, random_state=0)
  return x_tr, y_tr, x_te, y_te


def _load_digits(cfg) -> _Dataset:
  x_tr, y_tr, x_te, y_te = _digits_arrays()
  mean, std = np.array([x_tr.mean()]), np.array([x_tr.std()])
  size = cfg.image_size or 8
  if size != 8:  # resize once here rather than per batch
    x_tr, x_te = ([_resize(x, size, cfg.resize_method) for x in xs] for xs in (x_tr, x_te))
    x_tr, x_te = np.stack(x_tr), np.stack(x_te)
  info = DatasetInfo('digits', 10, (size, size, 1), len(y_tr), len(y_te))
  return _Dataset(info, {'train': _ArraySource(x_tr, y_tr), 'test': _ArraySource(x_te, y_te)},
                  mean, std, variable_size=False)


def _load_tfds(cfg) -> _Dataset:
  if cfg.name in ('cifar10_local', 'image_folder'):
    exact = cfg.name == 'cifar10_local'
    builder = datasets.folder_builder(cfg.archive, data_dir=cfg.data_dir, exact_size=exact,
                                      image_size=32 if exact else cfg.image_size)
  else:
    builder = datasets.stock_builder(cfg.name, data_dir=cfg.data_dir)
  test_split = 'validation' if cfg.name == 'imagenet2012' else 'test'
  splits = {'train': datasets.data_source(builder, 'train'), 'test': datasets.data_source(builder, test_split)}
  stored_shape = builder.info.features['image'].shape  # (S, S, 3), or (None, None, 3) for ImageNet
  variable = stored_shape[0] is None
  size = cfg.image_size or (224 if variable else stored_shape[0])
  if cfg.name in ('cifar10', 'cifar10_local'):
    mean, std = _CIFAR10_MEAN, _CIFAR10_STD
  elif cfg.name == 'cifar100':
    mean, std = _CIFAR100_MEAN, _CIFAR100_STD
  elif cfg.name == 'imagenet2012':
    mean, std = _IMAGENET_MEAN, _IMAGENET_STD
  else:
    sample = np.stack([r['image'] for r in splits['train'].__getitems__(
        range(min(len(splits['train']), _FOLDER_STATS_IMAGES)))]).astype(np.float64) / 255.0
    mean, std = sample.mean(axis=(0, 1, 2)), sample.std(axis=(0, 1, 2))
  info = DatasetInfo(cfg.name, builder.info.features['label'].num_classes, (size, size, stored_shape[-1]),
                     len(splits['train']), len(splits['test']))
  return _Dataset(info, splits, np.asarray(mean), np.asarray(std), variable)


@functools.lru_cache(maxsize=8)
def _load_cached(name, archive, data_dir, image_size, resize_method) -> _Dataset:
  cfg = ml_collections.ConfigDict(dict(name=name, archive=archive, data_dir=data_dir, image_size=image_size,
                                       resize_method=resize_method))
  return _load_digits(cfg) if name == 'digits' else _load_tfds(cfg)


def _load(data_cfg) -> _Dataset:
  if data_cfg.name not in NAMES:
    raise ValueError(f"Unknown data.name '{data_cfg.name}'; valid choices: {', '.join(NAMES)}.")
  if data_cfg.resize_method not in ('bilinear', 'nearest'):
    raise ValueError(f"data.resize_method='{data_cfg.resize_method}'; valid choices: bilinear, nearest.")
  ds = _load_cached(data_cfg.name, data_cfg.archive, data_cfg.data_dir, data_cfg.image_size,
                    data_cfg.resize_method)
  channels = ds.info.image_shape[-1]
  mean = np.asarray(data_cfg.mean or ds.mean, np.float32).reshape(-1)
  std = np.asarray(data_cfg.std or ds.std, np.float32).reshape(-1)
  if mean.size != channels or std.size != channels:
    raise ValueError(f'data.mean/data.std need {channels} values for {data_cfg.name}, '
                     f'got {mean.size} and {std.size}.')
  return dataclasses.replace(ds, mean=mean, std=std)


def get_info(data_cfg) -> DatasetInfo:
  """Sizes and shapes of the configured dataset (prepares cifar10_local/image_folder the first time)."""
  return _load(data_cfg).info


# ----------------------------------------------------------------------------------------------------------
# Per-example preprocessing. Images are [H, W, C]: uint8 (tfds) or float32 in [0, 1] (digits).


def _to_uint8(image: np.ndarray) -> np.ndarray:
  if image.dtype == np.uint8:
    return image
  return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)


def _to_float(image: np.ndarray) -> np.ndarray:
  if image.dtype == np.uint8:
    return image.astype(np.float32) / 255.0
  return image.astype(np.float32)


def _pil(image: np.ndarray) -> Image.Image:
  image = _to_uint8(image)
  return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def _from_pil(img: Image.Image, channels: int) -> np.ndarray:
  return np.asarray(img, np.uint8).reshape(img.size[1], img.size[0], channels)


def _random_resized_crop_box(rng: np.random.Generator, height: int, width: int,
                             min_scale: float) -> tuple[float, float, float, float]:
  """(left, top, right, bottom): area fraction in [min_scale, 1], aspect ratio in [3/4, 4/3] (log-uniform)."""
  area = height * width
  for _ in range(10):
    target = area * rng.uniform(min_scale, 1.0)
    ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    w, h = np.sqrt(target * ratio), np.sqrt(target / ratio)
    if w <= width and h <= height:
      left, top = rng.uniform(0, width - w), rng.uniform(0, height - h)
      return left, top, left + w, top + h
  side = min(height, width)  # rare fallback: the central square
  left, top = (width - side) / 2, (height - side) / 2
  return left, top, left + side, top + side


def _center_crop_box(height: int, width: int, fraction: float) -> tuple[float, float, float, float]:
  side = min(height, width) * fraction
  left, top = (width - side) / 2, (height - side) / 2
  return left, top, left + side, top + side


def _fit_size(image: np.ndarray, size: int, *, ds: _Dataset, aug, rng, train: bool, method: str) -> np.ndarray:
  """Brings one stored image to [size, size, C]: random resized crop, central crop (variable sizes) or resize."""
  height, width, channels = image.shape
  resample = {'bilinear': Image.BILINEAR, 'nearest': Image.NEAREST}[method]
  if train and aug.random_resized_crop:
    box = _random_resized_crop_box(rng, height, width, aug.rrc_min_scale)
  elif ds.variable_size:
    box = _center_crop_box(height, width, _IMAGENET_CROP_FRACTION)
  elif (height, width) == (size, size):
    return image
  else:
    return _resize(image, size, method)
  resized = _pil(image).resize((size, size), resample, box=box)
  out = _from_pil(resized, channels)
  return out if image.dtype == np.uint8 else _to_float(out)


def _randaugment_ops() -> list[tuple[str, Callable]]:
  """(name, op(img, level in [0, 1], sign, fill)); geometric ranges follow the RandAugment/timm conventions."""

  def affine(matrix):
    return lambda img, fill: img.transform(img.size, Image.AFFINE, matrix, resample=Image.BILINEAR,
                                           fillcolor=fill)

  return [
      ('identity', lambda img, lv, sg, fill: img),
      ('autocontrast', lambda img, lv, sg, fill: ImageOps.autocontrast(img)),
      ('equalize', lambda img, lv, sg, fill: ImageOps.equalize(img)),
      ('rotate', lambda img, lv, sg, fill: img.rotate(sg * 30.0 * lv, resample=Image.BILINEAR, fillcolor=fill)),
      ('solarize', lambda img, lv, sg, fill: ImageOps.solarize(img, threshold=int(round(256 - 256 * lv)))),
      ('posterize', lambda img, lv, sg, fill: ImageOps.posterize(img, max(1, 8 - int(round(4 * lv))))),
      ('color', lambda img, lv, sg, fill: ImageEnhance.Color(img).enhance(1 + sg * 0.9 * lv)),
      ('contrast', lambda img, lv, sg, fill: ImageEnhance.Contrast(img).enhance(1 + sg * 0.9 * lv)),
      ('brightness', lambda img, lv, sg, fill: ImageEnhance.Brightness(img).enhance(1 + sg * 0.9 * lv)),
      ('sharpness', lambda img, lv, sg, fill: ImageEnhance.Sharpness(img).enhance(1 + sg * 0.9 * lv)),
      ('shear_x', lambda img, lv, sg, fill: affine((1, sg * 0.3 * lv, 0, 0, 1, 0))(img, fill)),
      ('shear_y', lambda img, lv, sg, fill: affine((1, 0, 0, sg * 0.3 * lv, 1, 0))(img, fill)),
      ('translate_x', lambda img, lv, sg, fill: affine((1, 0, sg * 0.45 * lv * img.size[0], 0, 1, 0))(img, fill)),
      ('translate_y', lambda img, lv, sg, fill: affine((1, 0, 0, 0, 1, sg * 0.45 * lv * img.size[1]))(img, fill)),
  ]


RANDAUGMENT_OPS = _randaugment_ops()


def randaugment(image: np.ndarray, rng: np.random.Generator, num_ops: int, magnitude: float) -> np.ndarray:
  """RandAugment: num_ops ops drawn uniformly with replacement, each at `magnitude` (0..10) with a random sign.

  image: [H, W, C] uint8 or float32 in [0, 1]; returns the same shape and dtype.
  """
  channels = image.shape[-1]
  img = _pil(image)
  fill = 128 if channels == 1 else (128,) * channels  # mid-grey where geometric ops uncover the border
  level = float(np.clip(magnitude, 0, 10)) / 10.0
  for k in rng.integers(len(RANDAUGMENT_OPS), size=num_ops):
    sign = 1.0 if rng.random() < 0.5 else -1.0
    img = RANDAUGMENT_OPS[k][1](img, level, sign, fill)
  out = _from_pil(img, channels)
  return out if image.dtype == np.uint8 else _to_float(out)


def _shift(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
  """out[y, x] = image[y + dy, x + dx], zero outside: the crop at offset (pad + dy, pad + dx) of the image
  zero-padded by pad pixels, without building the padded copy."""
  height, width = image.shape[:2]
  out = np.zeros_like(image)
  out[max(0, -dy):height - max(0, dy), max(0, -dx):width - max(0, dx)] = \
      image[max(0, dy):height + min(0, dy), max(0, dx):width + min(0, dx)]
  return out


def _train_example(image: np.ndarray, rng: np.random.Generator, *, ds: _Dataset, cfg) -> np.ndarray:
  """One stored image -> float32 [S, S, C] in [0, 1] pixel units, augmented (normalised later, per batch)."""
  aug, size = cfg.augment, ds.info.image_shape[0]
  image = _fit_size(image, size, ds=ds, aug=aug, rng=rng, train=True, method=cfg.resize_method)
  if aug.randaugment_ops > 0:
    image = randaugment(image, rng, aug.randaugment_ops, aug.randaugment_magnitude)
  image = _to_float(image)
  if aug.crop_padding > 0:
    dy, dx = rng.integers(-aug.crop_padding, aug.crop_padding + 1, size=2)
    image = _shift(image, int(dy), int(dx))
  if aug.flip and rng.random() < 0.5:
    image = image[:, ::-1]
  return image


def _eval_example(image: np.ndarray, *, ds: _Dataset, cfg) -> np.ndarray:
  image = _fit_size(image, ds.info.image_shape[0], ds=ds, aug=cfg.augment, rng=None, train=False,
                    method=cfg.resize_method)
  return _to_float(image)


def _normalise(images: np.ndarray, ds: _Dataset) -> np.ndarray:
  return ((images - ds.mean) / ds.std).astype(np.float32)


def _mix_pair(x_self: np.ndarray, x_other: np.ndarray, rng: np.random.Generator, aug) -> tuple[np.ndarray, float]:
  """Mixup or cutmix of one image of a pair with the other; returns (image, weight of x_self).

  Both members of a pair call this with an rng in the same state, so they draw the same weight/box.
  """
  use_cutmix = aug.cutmix_alpha > 0 and (aug.mixup_alpha <= 0 or rng.random() < 0.5)
  if not use_cutmix:
    lam = rng.beta(aug.mixup_alpha, aug.mixup_alpha)
    return lam * x_self + (1 - lam) * x_other, float(lam)
  height, width = x_self.shape[:2]
  lam = rng.beta(aug.cutmix_alpha, aug.cutmix_alpha)
  cut_h, cut_w = int(height * np.sqrt(1 - lam)), int(width * np.sqrt(1 - lam))
  cy, cx = rng.integers(height), rng.integers(width)
  top, bottom = np.clip([cy - cut_h // 2, cy + cut_h - cut_h // 2], 0, height)
  left, right = np.clip([cx - cut_w // 2, cx + cut_w - cut_w // 2], 0, width)
  out = x_self.copy()
  out[top:bottom, left:right] = x_other[top:bottom, left:right]
  return out, 1.0 - (bottom - top) * (right - left) / (height * width)  # the pasted area decides the weight


# ----------------------------------------------------------------------------------------------------------
# Batches.


def _rng(*key: int) -> np.random.Generator:
  return np.random.default_rng([int(k) for k in key])


@functools.lru_cache(maxsize=4)  # a batch touches at most two epochs; steps advance monotonically
def _epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  return _rng(seed, _PERMUTE, epoch).permutation(n)


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f'global_batch_size={global_batch_size} is not a positive multiple of process_count='
                     f'{process_count}; set the batch size to a multiple of {process_count} '
                     f'(e.g. {process_count * max(1, global_batch_size // process_count)}).')
  return global_batch_size // process_count


def _processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not 0 <= index < count:
    raise ValueError(f'process_index={index} is outside [0, process_count={count}).')
  return index, count


def _one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
  return np.eye(num_classes, dtype=np.float32)[labels]


def _train_batch(step: int, *, ds: _Dataset, cfg, seed: int, global_batch_size: int, local_batch_size: int,
                 process_index: int, num_classes: int) -> dict:
  aug = cfg.augment
  mixing = aug.mixup_alpha > 0 or aug.cutmix_alpha > 0
  local = np.arange(local_batch_size) + process_index * local_batch_size  # positions in the global batch
  partner = local ^ 1  # pairs (2k, 2k+1); an odd batch's last example pairs with itself, i.e. is not mixed
  partner = np.where(partner < global_batch_size, partner, local)
  needed = np.union1d(local, partner) if mixing else local
  train = ds.splits['train']
  n = len(train)
  stream = step * global_batch_size + needed.astype(np.int64)
  indices = [int(_epoch_permutation(seed, int(q // n), n)[q % n]) for q in stream]
  records = dict(zip(needed.tolist(), train.__getitems__(indices)))
  images = {g: _train_example(r['image'], _rng(seed, _AUGMENT, step, g), ds=ds, cfg=cfg)
            for g, r in records.items()}
  labels = np.array([records[g]['label'] for g in local], np.int32)
  onehot = {g: _one_hot(np.int32(r['label']), num_classes) for g, r in records.items()}
  out_images, targets = [], []
  for g, p in zip(local.tolist(), partner.tolist()):
    if mixing and p != g:
      image, lam = _mix_pair(images[g], images[p], _rng(seed, _MIX, step, min(g, p)), aug)
      target = lam * onehot[g] + (1 - lam) * onehot[p]
    else:
      image, target = images[g], onehot[g]
    out_images.append(image)
    targets.append(target)
  # Mixing commutes with the affine normalisation, so normalising the mixed batch once is the same.
  return {'image': _normalise(np.stack(out_images), ds), 'label': labels,
          'target': np.stack(targets).astype(np.float32)}


def _eval_batch(batch: int, *, ds: _Dataset, cfg, split: str, global_batch_size: int, local_batch_size: int,
                process_index: int, num_classes: int, num_examples: int, stride: int) -> dict:
  source = ds.splits[split]
  positions = batch * global_batch_size + process_index * local_batch_size + np.arange(local_batch_size)
  valid = positions < num_examples
  records = source.__getitems__((positions[valid] * stride).tolist())
  shape = ds.info.image_shape
  image = np.zeros((local_batch_size, *shape), np.float32)
  label = np.zeros((local_batch_size,), np.int32)
  for i, r in enumerate(records):  # valid positions form a prefix
    image[i] = _eval_example(r['image'], ds=ds, cfg=cfg)
    label[i] = r['label']
  image[:len(records)] = _normalise(image[:len(records)], ds)  # padding stays exactly zero
  target = _one_hot(label, num_classes) * valid[:, None]
  return {'image': image, 'label': label, 'target': target.astype(np.float32), 'mask': valid.astype(np.float32)}


def _run(make_batch: Callable[[int], dict], start: int, stop: int, cfg) -> Iterator[dict]:
  """make_batch(i) for i in [start, stop), in order, prepared ahead in background threads when configured."""
  if cfg.num_threads <= 0:
    return map(make_batch, range(start, stop))
  dataset = grain.MapDataset.range(start, stop).map(make_batch)
  return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=cfg.num_threads,
                                                        prefetch_buffer_size=max(1, cfg.prefetch))))


def train_batches(data_cfg, *, global_batch_size: int, seed: int, start_step: int = 0,
                  num_classes: int | None = None, process_index: int | None = None,
                  process_count: int | None = None) -> Iterator[dict]:
  """Endless augmented train batches for this process, starting at global step `start_step`.

  Yields {'image': float32 [B, H, W, C] normalised, 'label': int32 [B] (the example's own label),
  'target': float32 [B, num_classes] (one-hot, or mixed by mixup/cutmix)}, B = global_batch_size /
  process_count. num_classes: width of 'target' (default: the dataset's). seed: a non-negative int.
  """
  if seed < 0 or start_step < 0:
    raise ValueError(f'seed ({seed}) and start_step ({start_step}) must be non-negative.')
  process_index, process_count = _processes(process_index, process_count)
  local_batch_size = _local_batch_size(global_batch_size, process_count)
  ds = _load(data_cfg)
  data_cfg = ml_collections.FrozenConfigDict(data_cfg)  # batches prepared ahead must not see later edits
  make_batch = functools.partial(
      _train_batch, ds=ds, cfg=data_cfg, seed=seed, global_batch_size=global_batch_size,
      local_batch_size=local_batch_size, process_index=process_index,
      num_classes=num_classes or ds.info.num_classes)
  return _run(make_batch, start_step, sys.maxsize, data_cfg)


def eval_batches(data_cfg, *, split: str = 'test', global_batch_size: int, num_classes: int | None = None,
                 process_index: int | None = None, process_count: int | None = None,
                 max_examples: int = 0) -> Iterator[dict]:
  """One pass over `split` ('test' or 'train'), no augmentation, in stored order.

  `max_examples` > 0 evaluates an evenly strided subset of that size (every k-th example, so a split stored
  class by class stays balanced); 0 = the whole split.

  Every process yields the same number of batches, ceil(N / global_batch_size); positions past the end are
  padding: zero image, label 0, zero target, and 'mask' float32 [B] is 0 there and 1 for real examples.
  """
  process_index, process_count = _processes(process_index, process_count)
  local_batch_size = _local_batch_size(global_batch_size, process_count)
  ds = _load(data_cfg)
  if split == 'validation':
    split = 'test'
  if split not in ds.splits:
    raise ValueError(f"split='{split}'; valid choices: train, test.")
  total = len(ds.splits[split])
  if max_examples < 0:
    raise ValueError(f'max_examples must be >= 0 (0 = the whole split), got {max_examples}.')
  num_examples = min(max_examples, total) if max_examples else total
  stride = total // num_examples if num_examples else 1
  num_batches = -(-num_examples // global_batch_size)
  data_cfg = ml_collections.FrozenConfigDict(data_cfg)
  make_batch = functools.partial(
      _eval_batch, ds=ds, cfg=data_cfg, split=split, global_batch_size=global_batch_size,
      local_batch_size=local_batch_size, process_index=process_index,
      num_classes=num_classes or ds.info.num_classes, num_examples=num_examples, stride=stride)
  return _run(make_batch, 0, num_batches, data_cfg)
