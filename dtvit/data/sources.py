"""Data sources: random-access train/test splits of {'image', 'label'} records, and their statistics.

Chosen by `config.data.name`:
  digits         scikit-learn's bundled `load_digits()` (1797 real 8x8 digits), split once (stratified, seed 0)
                 into 1437 train / 360 test. In memory; the quickstart default.
  cifar10_local  a CIFAR-style folder or .tar.gz (`train/<class>/*.jpg`, `test/<class>/*.jpg`, 32x32) given by
                 `data.archive`, prepared once into `data.data_dir` as ArrayRecord by `dtvit.data.tfds_folder`
                 and read with random access. The real copy lives at ../shared/data/cifar10-jpg.tar.gz (about
                 22 s to prepare on 2 cores, ~170 MB). Normalised with the CIFAR-10 statistics.
  image_folder   the same layout with any image size: stored resized to `data.image_size` (0 = the side of the
                 first train image); mean/std estimated from up to 5000 train images unless given.
  cifar10, cifar100, imagenet2012
                 stock tfds builders, only if already prepared in `data.data_dir` with
                 `--file_format=array_record` (nothing can be downloaded here; the error says what to do).
                 ImageNet's eval split is 'validation' (asked for as 'test' too).

What needs TensorFlow: nothing on these paths. Preparing `cifar10_local`/`image_folder` writes `Tensor(uint8)`
features to ArrayRecord (TF-free), and `tfds.data_source` reads ArrayRecord without TF, decoding the stock
builders' `Image` features with PIL. TensorFlow is needed only for what dtvit does not do: preparing the
stock builders (`tfds build`, which encodes `tfds.features.Image`), TFRecord files, `tfds.load`/`as_dataset`/
`as_numpy`, and `tfds.folder_dataset.ImageFolder`.
"""
import dataclasses
import functools
import os
from typing import Sequence

import ml_collections
import numpy as np

from dtvit.data import augment

DATA_DIR_ENV = 'DTVIT_DATA_DIR'
NAMES = ('digits', 'cifar10_local', 'image_folder', 'cifar10', 'cifar100', 'imagenet2012')
_STATS = {  # per-channel (mean, std) in [0, 1] pixel units
    'cifar10': ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    'cifar10_local': ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    'cifar100': ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    'imagenet2012': ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
_FOLDER_STATS_IMAGES = 5000


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  name: str
  num_classes: int
  image_shape: tuple  # (H, W, C) after preprocessing
  num_train: int  # the examples training reads (the train split less the validation examples)
  num_test: int
  num_val: int = 0  # train examples held out for validation (`data.val_examples`)


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A loaded dataset: random-access splits of {'image', 'label'} records plus how to preprocess them."""
  info: DatasetInfo
  splits: dict  # 'train' / 'test' (/ 'val') -> source with __len__, __getitem__ and __getitems__(indices)
  mean: np.ndarray  # float32 [C]
  std: np.ndarray  # float32 [C]
  variable_size: bool  # stored images differ in size (ImageNet): crop/resize each to image_size


class ArraySource:
  """In-memory records with the random-access interface of tfds data sources."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self.images, self.labels = images, labels

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict:
    return {'image': self.images[index], 'label': self.labels[index]}

  def __getitems__(self, indices: Sequence[int]) -> list[dict]:
    return [self[i] for i in indices]


class Subset:
  """The records `indices` of another source, renumbered 0..len-1 (same random-access interface)."""

  def __init__(self, source, indices: np.ndarray):
    self.source, self.indices = source, indices

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int) -> dict:
    return self.source[int(self.indices[index])]

  def __getitems__(self, indices: Sequence[int]) -> list[dict]:
    return self.source.__getitems__([int(i) for i in self.indices[np.asarray(indices, np.int64)]])


@functools.lru_cache(maxsize=8)
def val_indices(num_train: int, num_val: int) -> tuple[np.ndarray, np.ndarray]:
  """(train indices, validation indices) of a train split of `num_train` records, both sorted int64: the
  validation set is `num_val` records drawn by a fixed generator (seed 0), so it is the same for every run and
  every `config.seed`; the train indices are all the others."""
  if not 0 <= num_val < num_train:
    raise ValueError(f'data.val_examples={num_val} must be in [0, {num_train}) (the train split has {num_train} '
                     f'examples); set data.val_examples to the number of train examples to hold out, 0 for none.')
  chosen = np.zeros(num_train, bool)
  chosen[np.random.default_rng(0).permutation(num_train)[:num_val]] = True
  return np.flatnonzero(~chosen).astype(np.int64), np.flatnonzero(chosen).astype(np.int64)


def _hold_out(ds: Dataset, num_val: int) -> Dataset:
  """`ds` with `num_val` train examples moved to a 'val' split that training never reads."""
  if not num_val:
    return ds
  train_idx, val_idx = val_indices(ds.info.num_train, num_val)
  train = ds.splits['train']
  splits = dict(ds.splits, train=Subset(train, train_idx), val=Subset(train, val_idx))
  info = dataclasses.replace(ds.info, num_train=len(train_idx), num_val=len(val_idx))
  return dataclasses.replace(ds, info=info, splits=splits)


@functools.lru_cache(maxsize=None)
def digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(train images float32 [1437, 8, 8, 1] in [0, 1], train labels, test images [360, 8, 8, 1], test labels)."""
  from sklearn import datasets as sk_datasets, model_selection  # only the digits source needs scikit-learn
  digits = sk_datasets.load_digits()
  images = (digits.images / 16.0).astype(np.float32)[..., None]  # pixel values are counts 0..16
  labels = digits.target.astype(np.int32)
  x_tr, x_te, y_tr, y_te = model_selection.train_test_split(
      images, labels, test_size=360, stratify=labels, random_state=0)
  return x_tr, y_tr, x_te, y_te


def _load_digits(cfg) -> Dataset:
  x_tr, y_tr, x_te, y_te = digits_arrays()
  mean, std = np.array([x_tr.mean()]), np.array([x_tr.std()])
  size = cfg.image_size or 8
  if size != 8:  # resize once here rather than per example
    x_tr, x_te = (np.stack([augment.resize(x, size, cfg.resize_method) for x in xs]) for xs in (x_tr, x_te))
  info = DatasetInfo('digits', 10, (size, size, 1), len(y_tr), len(y_te))
  return Dataset(info, {'train': ArraySource(x_tr, y_tr), 'test': ArraySource(x_te, y_te)},
                 mean, std, variable_size=False)


def _tfds_builder(cfg):
  from dtvit.data import tfds_folder  # tensorflow_datasets is imported only by the sources that need it
  if cfg.name in ('cifar10_local', 'image_folder'):
    exact = cfg.name == 'cifar10_local'
    return tfds_folder.folder_builder(cfg.archive, data_dir=cfg.data_dir, exact_size=exact,
                                      image_size=32 if exact else cfg.image_size)
  return tfds_folder.stock_builder(cfg.name, data_dir=cfg.data_dir)


def _folder_stats(train) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and std of up to _FOLDER_STATS_IMAGES train images, in [0, 1] units."""
  records = train.__getitems__(range(min(len(train), _FOLDER_STATS_IMAGES)))
  sample = np.stack([r['image'] for r in records]).astype(np.float64) / 255.0
  return sample.mean(axis=(0, 1, 2)), sample.std(axis=(0, 1, 2))


def _load_tfds(cfg) -> Dataset:
  from dtvit.data import tfds_folder
  builder = _tfds_builder(cfg)
  test_split = 'validation' if cfg.name == 'imagenet2012' else 'test'
  splits = {'train': tfds_folder.data_source(builder, 'train'),
            'test': tfds_folder.data_source(builder, test_split)}
  stored_shape = builder.info.features['image'].shape  # (S, S, 3), or (None, None, 3) for ImageNet
  variable = stored_shape[0] is None
  size = cfg.image_size or (224 if variable else stored_shape[0])
  mean, std = _STATS[cfg.name] if cfg.name in _STATS else _folder_stats(splits['train'])
  info = DatasetInfo(cfg.name, builder.info.features['label'].num_classes, (size, size, stored_shape[-1]),
                     len(splits['train']), len(splits['test']))
  return Dataset(info, splits, np.asarray(mean), np.asarray(std), variable)


@functools.lru_cache(maxsize=8)
def _load_cached(name, archive, data_dir, image_size, resize_method) -> Dataset:
  cfg = ml_collections.ConfigDict(dict(name=name, archive=archive, data_dir=data_dir, image_size=image_size,
                                       resize_method=resize_method))
  return _load_digits(cfg) if name == 'digits' else _load_tfds(cfg)


def load(data_cfg) -> Dataset:
  """The dataset `data_cfg` names (`config.data`), with its mean/std overrides applied and `data.val_examples`
  train examples held out as the 'val' split (`val_indices`); cached per source. The dataset statistics of an
  image folder are estimated before the hold-out (they include the validation images)."""
  if data_cfg.name not in NAMES:
    raise ValueError(f"Unknown data.name '{data_cfg.name}'; valid choices: {', '.join(NAMES)}.")
  if data_cfg.resize_method not in augment.RESIZE_METHODS:
    raise ValueError(f"data.resize_method='{data_cfg.resize_method}'; valid choices: "
                     f"{', '.join(augment.RESIZE_METHODS)}.")
  ds = _load_cached(data_cfg.name, resolve_path(data_cfg.archive, 'data.archive'),
                    resolve_path(data_cfg.data_dir, 'data.data_dir'), data_cfg.image_size, data_cfg.resize_method)
  channels = ds.info.image_shape[-1]
  mean = np.asarray(data_cfg.mean or ds.mean, np.float32).reshape(-1)
  std = np.asarray(data_cfg.std or ds.std, np.float32).reshape(-1)
  if mean.size != channels or std.size != channels:
    raise ValueError(f'data.mean/data.std need {channels} values for {data_cfg.name}, '
                     f'got {mean.size} and {std.size}.')
  return _hold_out(dataclasses.replace(ds, mean=mean, std=std), data_cfg.get('val_examples', 0))


def get_info(data_cfg) -> DatasetInfo:
  """Sizes and shapes of the configured dataset (prepares cifar10_local/image_folder the first time)."""
  return load(data_cfg).info


def project_root() -> str | None:
  """The checkout dtvit runs from (the folder holding dtvit/, configs/ and pyproject.toml), or None for an
  installed copy (dtvit/ in site-packages)."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  return root if os.path.isfile(os.path.join(root, 'pyproject.toml')) else None


def resolve_path(path: str, what: str = 'data path') -> str:
  """An absolute `data.archive` / `data.data_dir`, never resolved against the current directory.

  '' stays '' (no archive; the tfds default data_dir). '~' is expanded. A relative path is taken against
  $DTVIT_DATA_DIR when set, else against the dtvit checkout (where the recipes' relative paths, such as
  '../shared/data/cifar10-jpg.tar.gz' and 'data_dir', point from); an installed dtvit without a checkout needs
  $DTVIT_DATA_DIR or an absolute path. A URL (gs://...) is refused in one line: the ArrayRecord reader of
  `tfds.data_source` (array_record's C++ reader) and the archive reader open local files only; stage the data on
  local disk first (docs/cloud.md)."""
  if not path:
    return path
  if '://' in str(path):
    raise ValueError(f'{what}={path}: the data readers here read local files only (array_record and tarfile open '
                     f'no URLs); copy the data to local disk first (gcloud storage cp -r {path} /local/data) and '
                     f'pass {what}=/local/data (docs/cloud.md).')
  path = os.path.expanduser(path)
  if os.path.isabs(path):
    return os.path.normpath(path)
  base = os.environ.get(DATA_DIR_ENV) or project_root()
  if base is None:
    raise ValueError(f'{what}={path!r} is relative and dtvit is installed without a checkout to resolve it '
                     f'against: set {DATA_DIR_ENV}=<folder it is relative to>, or give an absolute path.')
  return os.path.normpath(os.path.join(os.path.abspath(os.path.expanduser(base)), path))
