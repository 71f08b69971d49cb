"""Tests for dtvit.data's sources, augmentation and grain batching: digits in memory, tiny archives prepared via
tfds. On-device mixing is tested in mixing_test.py."""
import io
import itertools
import os
import tarfile

import chex
import numpy as np
from PIL import Image
import pytest

from dtvit import data
from dtvit.data import augment
from dtvit.data import tfds_folder

REAL_ARCHIVE = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data', 'cifar10-jpg.tar.gz')


def _config(name='digits', **augment):
  cfg = data.default_data_config()
  cfg.name = name
  cfg.augment.update(augment)
  return cfg


def _augmented(**overrides):
  """Every random per-example augmentation on, to exercise every draw from the example's rng."""
  aug = dict(crop_padding=2, flip=True, randaugment_ops=2, randaugment_magnitude=9, random_resized_crop=True,
             rrc_min_scale=0.3)
  aug.update(overrides)
  cfg = _config(**aug)
  cfg.image_size = 12
  return cfg


def _take(iterator, n):
  return list(itertools.islice(iterator, n))


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ---------------------------------------------------------------------------------------------------------
# digits


def test_digits_info_and_stratified_split():
  info = data.get_info(_config())
  assert info == data.DatasetInfo('digits', 10, (8, 8, 1), 1437, 360)
  labels = np.concatenate([b['label'] for b in data.eval_batches(_config(), global_batch_size=360)])
  all_labels = np.concatenate([labels] + [b['label'] for b in data.eval_batches(
      _config(), split='train', global_batch_size=1437)])
  # Stratified: each class keeps its share of the 1797 digits in the 360 test images, up to rounding.
  expected = np.bincount(all_labels, minlength=10) * 360 / 1797
  assert np.abs(np.bincount(labels, minlength=10) - expected).max() < 1


def test_digits_train_batch_shapes_and_normalisation():
  cfg = _config(crop_padding=0)
  # 1437 = 3 * 479: three unaugmented batches are exactly epoch 0, a permutation of the train set.
  batches = _take(data.train_batches(cfg, global_batch_size=479, seed=0), 3)
  b = batches[0]
  chex.assert_shape(b['image'], (479, 8, 8, 1))
  chex.assert_shape(b['label'], (479,))
  chex.assert_shape(b['target'], (479, 10))
  assert (b['image'].dtype, b['label'].dtype, b['target'].dtype) == (np.float32, np.int32, np.float32)
  assert b['label'].min() >= 0 and b['label'].max() < 10
  np.testing.assert_array_equal(b['target'], np.eye(10)[b['label']])
  images = np.concatenate([x['image'] for x in batches])
  np.testing.assert_allclose(images.mean(), 0.0, atol=1e-5)  # stats computed from the train split
  np.testing.assert_allclose(images.std(), 1.0, atol=1e-5)
  # The epoch holds every train example exactly once: same multiset of images as the ordered train split.
  ordered = next(data.eval_batches(cfg, split='train', global_batch_size=1437))['image']
  as_rows = lambda x: np.sort(x.reshape(len(x), -1).view(np.dtype((np.void, 64 * 4))).ravel())
  np.testing.assert_array_equal(as_rows(images), as_rows(ordered))


def test_digits_pixels_are_scaled_counts():
  cfg = _config()
  normalised = next(data.eval_batches(cfg, global_batch_size=360))['image']
  cfg.mean, cfg.std = (0.0,), (1.0,)  # normalisation off: pixels are the raw counts 0..16 divided by 16
  raw = next(data.eval_batches(cfg, global_batch_size=360))['image'] * 16
  np.testing.assert_allclose(raw, np.round(raw), atol=1e-4)
  assert raw.min() > -1e-4 and raw.max() < 16 + 1e-4
  # The normalised pixels are an increasing affine map of the raw ones.
  slope, intercept = np.polyfit(raw.ravel(), normalised.ravel(), 1)
  np.testing.assert_allclose(normalised, slope * raw + intercept, atol=1e-4)
  assert slope > 0


def test_digits_image_size_upsamples():
  small = next(data.eval_batches(_config(), global_batch_size=360))
  cfg = _config()
  cfg.image_size, cfg.resize_method = 16, 'nearest'
  assert data.get_info(cfg).image_shape == (16, 16, 1)
  big = next(data.eval_batches(cfg, global_batch_size=360))
  chex.assert_shape(big['image'], (360, 16, 16, 1))
  # Nearest 2x upsampling repeats each pixel in a 2x2 block; normalisation stats are the 8x8 ones.
  np.testing.assert_allclose(big['image'], small['image'].repeat(2, axis=1).repeat(2, axis=2), atol=1e-6)
  cfg.resize_method = 'bilinear'
  chex.assert_shape(next(data.train_batches(cfg, global_batch_size=4, seed=0))['image'], (4, 16, 16, 1))


# ---------------------------------------------------------------------------------------------------------
# determinism, resume, processes


def test_same_seed_same_batches_and_threads_do_not_matter():
  cfg = _augmented()
  a = _take(data.train_batches(cfg, global_batch_size=32, seed=3), 3)
  cfg.num_threads = 0
  b = _take(data.train_batches(cfg, global_batch_size=32, seed=3), 3)
  _assert_batches_equal(a, b)
  c = _take(data.train_batches(cfg, global_batch_size=32, seed=4), 1)[0]
  assert not np.array_equal(a[0]['label'], c['label'])  # a different seed shuffles differently


def test_start_step_resumes_exactly_across_an_epoch_boundary():
  cfg = _augmented()
  # 1437 train examples, batch 500: step 2 straddles epochs 0 and 1, step 3 lies in epoch 1.
  full = _take(data.train_batches(cfg, global_batch_size=500, seed=7), 5)
  resumed = _take(data.train_batches(cfg, global_batch_size=500, seed=7, start_step=2), 3)
  _assert_batches_equal(full[2:], resumed)
  assert not np.array_equal(full[0]['label'], full[3]['label'])  # epochs are permuted differently


@pytest.mark.parametrize('global_batch_size', [14, 16])  # 14: an odd local batch of 7
def test_two_processes_split_the_global_batch(global_batch_size):
  cfg = _augmented()
  whole = _take(data.train_batches(cfg, global_batch_size=global_batch_size, seed=1, start_step=5,
                                 process_index=0, process_count=1), 2)
  parts = [_take(data.train_batches(cfg, global_batch_size=global_batch_size, seed=1, start_step=5,
                                  process_index=p, process_count=2), 2) for p in range(2)]
  for step in range(2):
    for k in whole[step]:
      joined = np.concatenate([parts[0][step][k], parts[1][step][k]])
      np.testing.assert_allclose(joined, whole[step][k], atol=1e-6, err_msg=k)
    assert len(parts[0][step]['label']) == global_batch_size // 2


def test_the_stream_does_not_depend_on_the_batch_size():
  # An example's place in the stream and its augmentation depend only on (seed, stream position): two batches
  # of 16 are one batch of 32, whatever the step or epoch.
  cfg = _augmented()
  small = _take(data.train_batches(cfg, global_batch_size=16, seed=5, start_step=88), 4)  # stream 1408..1471
  big = _take(data.train_batches(cfg, global_batch_size=32, seed=5, start_step=44), 2)  # crosses epoch 0 -> 1
  for b, (s0, s1) in zip(big, zip(small[::2], small[1::2])):
    for k in b:
      np.testing.assert_array_equal(np.concatenate([s0[k], s1[k]]), b[k], err_msg=k)


def test_mixing_is_left_to_the_device():
  # mixup/cutmix settings do not touch the pipeline: targets stay one-hot, images as without them.
  cfg = _augmented()
  clean = next(data.train_batches(cfg, global_batch_size=32, seed=2, start_step=3))
  cfg.augment.mixup_alpha, cfg.augment.cutmix_alpha = 0.8, 1.0
  mixed = next(data.train_batches(cfg, global_batch_size=32, seed=2, start_step=3))
  _assert_batches_equal([clean], [mixed])
  np.testing.assert_array_equal(mixed['target'], np.eye(10)[mixed['label']])


def test_eval_covers_the_split_once_with_padding_mask():
  cfg = _config()
  whole = list(data.eval_batches(cfg, global_batch_size=64))
  assert len(whole) == 6  # ceil(360 / 64)
  mask = np.concatenate([b['mask'] for b in whole])
  assert mask.dtype == np.float32 and mask.sum() == 360 and mask[:360].all()
  last = whole[-1]
  np.testing.assert_array_equal(last['image'][mask[-64:] == 0], 0.0)
  np.testing.assert_array_equal(last['target'][mask[-64:] == 0], 0.0)
  # Two processes: the same number of batches each, and together the same examples, each once.
  parts = [list(data.eval_batches(cfg, global_batch_size=64, process_index=p, process_count=2)) for p in (0, 1)]
  assert len(parts[0]) == len(parts[1]) == 6
  for b, b0, b1 in zip(whole, *parts):
    for k in b:
      np.testing.assert_array_equal(np.concatenate([b0[k], b1[k]]), b[k], err_msg=k)
  # No augmentation: two passes are identical.
  _assert_batches_equal(whole, list(data.eval_batches(cfg, global_batch_size=64)))


# ---------------------------------------------------------------------------------------------------------
# augmentation


def test_shift_is_a_crop_of_the_zero_padded_image():
  image = np.arange(5 * 6 * 2, dtype=np.float32).reshape(5, 6, 2) + 1
  padded = np.pad(image, ((2, 2), (2, 2), (0, 0)))
  for dy in range(-2, 3):
    for dx in range(-2, 3):
      np.testing.assert_array_equal(augment.shift(image, dy, dx), padded[2 + dy:7 + dy, 2 + dx:8 + dx])


def test_train_example_flips_half_the_time_and_shifts_within_the_padding():
  image = np.random.default_rng(0).random((8, 8, 1), dtype=np.float32)
  aug = data.default_data_config().augment
  aug.crop_padding, aug.flip = 0, True
  outs = [augment.train_example(image, np.random.default_rng(i), size=8, aug=aug) for i in range(400)]
  flipped = [np.array_equal(o, image[:, ::-1]) for o in outs]
  assert all(f or np.array_equal(o, image) for f, o in zip(flipped, outs))
  assert 0.4 < np.mean(flipped) < 0.6
  aug.crop_padding, aug.flip = 2, False
  padded = np.pad(image, ((2, 2), (2, 2), (0, 0)))
  crops = {(dy, dx): padded[dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)}
  seen = set()
  for i in range(400):
    out = augment.train_example(image, np.random.default_rng(i), size=8, aug=aug)
    seen.update(k for k, c in crops.items() if np.array_equal(out, c))
  assert seen == set(crops)  # every offset in [-2, 2]^2 occurs, and nothing else does (checked by the union)


def test_randaugment_ops_keep_shape_and_dtype():
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
  gray = rng.random((8, 8, 1), dtype=np.float32)
  for name, op in augment.RANDAUGMENT_OPS:
    for image in (rgb, gray):
      channels = image.shape[-1]
      img = augment.to_pil(image)
      out = augment.from_pil(op(img, 1.0, -1.0, 128 if channels == 1 else (128,) * channels), channels)
      assert out.shape == image.shape[:2] + (channels,) and out.dtype == np.uint8, name
  out = augment.randaugment(rgb, np.random.default_rng(1), num_ops=3, magnitude=9)
  assert out.shape == rgb.shape and out.dtype == np.uint8 and not np.array_equal(out, rgb)
  np.testing.assert_array_equal(out, augment.randaugment(rgb, np.random.default_rng(1), num_ops=3, magnitude=9))
  out = augment.randaugment(gray, np.random.default_rng(1), num_ops=2, magnitude=5)
  assert out.shape == gray.shape and out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1


# ---------------------------------------------------------------------------------------------------------
# archives prepared through tfds


def _encode(array, fmt):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, fmt)
  return buffer.getvalue()


def _write_tar(path, files):
  """files: {name inside archive: bytes}."""
  with tarfile.open(path, 'w:gz') as tar:
    for name, data in files.items():
      member = tarfile.TarInfo(name)
      member.size = len(data)
      tar.addfile(member, io.BytesIO(data))
  return str(path)


def _random_images(side=32, classes=('zebra', 'ant'), per_split=(3, 2)):
  """{(split, class, i): uint8 [side, side, 3]}; class names out of order to test the sorted labels."""
  rng = np.random.default_rng(0)
  return {(split, cls, i): rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
          for split, n in zip(('train', 'test'), per_split) for cls in classes for i in range(n)}


def _raw_batch(cfg, split):
  """All examples of a split as stored: normalisation off (mean 0, std 1), pixels back in 0..255."""
  cfg.mean, cfg.std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
  b = next(data.eval_batches(cfg, split=split, global_batch_size=64))
  n = int(b['mask'].sum())
  return np.round(b['image'][:n] * 255).astype(np.uint8), b['label'][:n]


def test_local_archive_prepares_once_and_reads_back_pixels_and_labels(tmp_path):
  images = _random_images()
  archive = _write_tar(tmp_path / 'tiny-cifar.tar.gz',
                       {f'{s}/{c}/{i}.png': _encode(x, 'PNG') for (s, c, i), x in images.items()})
  cfg = _config('cifar10_local', crop_padding=4, flip=True)
  cfg.archive, cfg.data_dir = archive, str(tmp_path / 'data_dir')
  assert data.get_info(cfg) == data.DatasetInfo('cifar10_local', 2, (32, 32, 3), 6, 4)
  for split in ('train', 'test'):
    pixels, labels = _raw_batch(cfg, split)
    expected = {x.tobytes(): ['ant', 'zebra'].index(c) for (s, c, _), x in images.items() if s == split}
    assert sorted(x.tobytes() for x in pixels) == sorted(expected)  # PNG is lossless: exact pixels
    assert [expected[x.tobytes()] for x in pixels] == labels.tolist()
  b = next(data.train_batches(cfg, global_batch_size=4, seed=0))
  chex.assert_shape(b['image'], (4, 32, 32, 3))
  cfg.image_size = 48  # resized per example from the stored 32x32 copy, which is reused
  assert data.get_info(cfg).image_shape == (48, 48, 3)
  chex.assert_shape(next(data.train_batches(cfg, global_batch_size=4, seed=0))['image'], (4, 48, 48, 3))
  # Idempotent: with the archive gone, the prepared copy is found and reopened as is.
  os.remove(archive)
  builder = tfds_folder.folder_builder(archive, data_dir=cfg.data_dir, image_size=32, exact_size=True)
  assert builder.info.splits['train'].num_examples == 6
  assert builder.info.features['label'].names == ['ant', 'zebra']


def test_image_folder_from_a_directory_resizes_and_counts_classes(tmp_path):
  images = _random_images(side=20, classes=('c', 'b', 'a'), per_split=(2, 1))
  root = tmp_path / 'photos'
  for (split, cls, i), x in images.items():
    os.makedirs(root / split / cls, exist_ok=True)
    Image.fromarray(x).save(root / split / cls / f'{i}.jpg', quality=95)
  (root / 'train' / 'a' / 'notes.txt').write_text('not an image, ignored')
  cfg = _config('image_folder', crop_padding=0)
  cfg.archive, cfg.data_dir, cfg.image_size = str(root), str(tmp_path / 'dd'), 10
  assert data.get_info(cfg) == data.DatasetInfo('image_folder', 3, (10, 10, 3), 6, 3)
  pixels, labels = _raw_batch(cfg, 'test')
  # JPEG is lossy and the images were resized: compare with a resized copy, approximately.
  expected = {['a', 'b', 'c'].index(c): np.asarray(Image.fromarray(x).resize((10, 10), Image.BILINEAR))
              for (s, c, _), x in images.items() if s == 'test'}
  assert sorted(labels.tolist()) == [0, 1, 2]
  for x, label in zip(pixels, labels):
    assert np.abs(x.astype(int) - expected[label]).mean() < 12
  cfg.augment.random_resized_crop = True
  b = next(data.train_batches(cfg, global_batch_size=6, seed=0, process_index=0, process_count=1))
  chex.assert_shape(b['image'], (6, 10, 10, 3))


def test_random_resized_crop_box_bounds():
  rng = np.random.default_rng(0)
  for height, width in [(50, 80), (300, 200), (10, 10)]:
    for _ in range(200):
      left, top, right, bottom = augment.random_resized_crop_box(rng, height, width, min_scale=0.3)
      assert 0 <= left < right <= width + 1e-9 and 0 <= top < bottom <= height + 1e-9
      w, h = right - left, bottom - top
      if (w, h) != (width, height):  # a draw, or the fallback: the image with its ratio clamped into range
        assert 0.3 - 1e-9 <= w * h / (height * width) <= 1 + 1e-9
        assert 3 / 4 - 1e-9 <= w / h <= 4 / 3 + 1e-9


def test_corrupt_image_error_names_the_file(tmp_path):
  good = _encode(np.zeros((32, 32, 3), np.uint8), 'PNG')
  archive = _write_tar(tmp_path / 'bad.tar.gz', {'train/cat/0.png': good, 'test/cat/0.png': good,
                                                 'train/cat/broken.jpg': good[:40]})
  cfg = _config('cifar10_local')
  cfg.archive, cfg.data_dir = archive, str(tmp_path / 'dd')
  with pytest.raises(ValueError, match=r"Cannot decode image file 'train/cat/broken\.jpg'"):
    data.get_info(cfg)


def test_cifar10_local_rejects_other_image_sizes_by_name(tmp_path):
  archive = _write_tar(tmp_path / 'odd.tar.gz', {
      'train/cat/0.png': _encode(np.zeros((32, 32, 3), np.uint8), 'PNG'),
      'test/cat/big.png': _encode(np.zeros((40, 32, 3), np.uint8), 'PNG')})
  cfg = _config('cifar10_local')
  cfg.archive, cfg.data_dir = archive, str(tmp_path / 'dd')
  with pytest.raises(ValueError, match=r"'test/cat/big\.png'.*is 32x40, expected 32x32.*image_folder"):
    data.get_info(cfg)


# ---------------------------------------------------------------------------------------------------------
# errors


def test_unknown_name_lists_the_choices():
  with pytest.raises(ValueError, match=r"Unknown data.name 'mnist'; valid choices: digits, cifar10_local"):
    data.get_info(_config('mnist'))


@pytest.mark.parametrize('name', ['cifar10', 'imagenet2012'])
def test_missing_stock_dataset_says_how_to_provide_it(tmp_path, name):
  cfg = _config(name)
  cfg.data_dir = str(tmp_path)
  with pytest.raises(FileNotFoundError, match=rf"'{name}' is not prepared .*tfds build {name} .*"
                                              r"--file_format=array_record"):
    data.get_info(cfg)
  if name == 'cifar10':
    with pytest.raises(FileNotFoundError, match=r"data.name='cifar10_local' with data.archive="):
      next(data.train_batches(cfg, global_batch_size=8, seed=0, process_index=0, process_count=1))


def test_missing_archive_is_named(tmp_path):
  cfg = _config('cifar10_local')
  cfg.archive, cfg.data_dir = str(tmp_path / 'nowhere.tar.gz'), str(tmp_path)
  with pytest.raises(FileNotFoundError, match='nowhere.tar.gz does not exist'):
    data.get_info(cfg)
  cfg.archive = ''
  with pytest.raises(ValueError, match='set data.archive'):
    data.get_info(cfg)


def test_batch_not_divisible_by_process_count():
  with pytest.raises(ValueError, match=r'global_batch_size=10 is not a positive multiple of process_count=3; '
                                       r'set the batch size to a multiple of 3'):
    data.train_batches(_config(), global_batch_size=10, seed=0, process_index=0, process_count=3)
  with pytest.raises(ValueError, match='multiple of process_count=4'):
    data.eval_batches(_config(), global_batch_size=10, process_index=1, process_count=4)


# ---------------------------------------------------------------------------------------------------------
# the real CIFAR-10 copy (about 20-25 s to prepare on 2 cores)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(REAL_ARCHIVE),
                    reason=f'real CIFAR-10 archive not found at {REAL_ARCHIVE} (see ../shared/data/README.md)')
def test_real_cifar10_archive(tmp_path):
  cfg = _config('cifar10_local', crop_padding=4, flip=True, randaugment_ops=2)
  cfg.archive, cfg.data_dir = REAL_ARCHIVE, str(tmp_path)
  assert data.get_info(cfg) == data.DatasetInfo('cifar10_local', 10, (32, 32, 3), 50000, 10000)
  builder = tfds_folder.folder_builder(REAL_ARCHIVE, data_dir=cfg.data_dir, image_size=32, exact_size=True)
  assert builder.info.features['label'].names[:3] == ['airplane', 'automobile', 'bird']
  b = next(data.train_batches(cfg, global_batch_size=256, seed=0, process_index=0, process_count=1))
  chex.assert_shape(b['image'], (256, 32, 32, 3))
  assert len(np.unique(b['label'])) == 10
  test = list(data.eval_batches(cfg, global_batch_size=1000))
  assert len(test) == 10 and sum(x['mask'].sum() for x in test) == 10000
  # Normalised with the CIFAR-10 statistics, which this JPEG copy matches closely (per channel).
  images = np.concatenate([x['image'] for x in test])
  np.testing.assert_allclose(images.mean(axis=(0, 1, 2)), 0.0, atol=0.03)
  np.testing.assert_allclose(images.std(axis=(0, 1, 2)), 1.0, atol=0.03)


def test_eval_subset_is_strided_and_complete():
  cfg = data.default_data_config()
  full = np.concatenate([b['label'][b['mask'] > 0] for b in data.eval_batches(cfg, global_batch_size=64)])
  sub = [b for b in data.eval_batches(cfg, global_batch_size=64, max_examples=100)]
  labels = np.concatenate([b['label'][b['mask'] > 0] for b in sub])
  assert len(labels) == 100 and len(sub) == 2
  np.testing.assert_array_equal(labels, full[::len(full) // 100][:100])
  with pytest.raises(ValueError, match='max_examples must be >= 0'):
    next(data.eval_batches(cfg, global_batch_size=64, max_examples=-1))


# ---------------------------------------------------------------------------------------------------------
# validation split held out from train


def _rows(images):
  """Each image as bytes, counted (a multiset: equal digits may occur twice)."""
  from collections import Counter
  return Counter(x.tobytes() for x in images)


def test_val_split_is_held_out_from_train_and_never_trained_on():
  from dtvit.data import sources
  train_idx, val_idx = sources.val_indices(1437, 100)
  assert len(val_idx) == 100 and len(train_idx) == 1337
  assert not set(train_idx) & set(val_idx)
  np.testing.assert_array_equal(np.sort(np.concatenate([train_idx, val_idx])), np.arange(1437))
  assert sources.val_indices(1437, 100)[1] is val_idx  # fixed: the same for every run and seed

  cfg = _config(crop_padding=0)  # no augmentation: the stream's images are the stored ones
  cfg.val_examples = 100
  info = data.get_info(cfg)
  assert (info.num_train, info.num_val, info.num_test) == (1337, 100, 360)
  val = next(data.eval_batches(cfg, split='val', global_batch_size=100))
  train = next(data.eval_batches(cfg, split='train', global_batch_size=1337))
  whole_cfg = _config(crop_padding=0)
  whole = next(data.eval_batches(whole_cfg, split='train', global_batch_size=1437))
  assert _rows(train['image']) + _rows(val['image']) == _rows(whole['image'])
  np.testing.assert_array_equal(val['label'], whole['label'][val_idx])
  # The train stream: one epoch (a batch of 1337) is exactly the train split without the held-out images,
  # for any seed, and so is the next epoch.
  for seed in (0, 1):
    epochs = _take(data.train_batches(cfg, global_batch_size=1337, seed=seed), 2)
    for epoch in epochs:
      assert _rows(epoch['image']) == _rows(train['image'])


def test_val_split_errors_name_the_fix():
  cfg = _config()
  with pytest.raises(ValueError, match=r"split='val' needs held-out train examples: set data.val_examples > 0"):
    data.eval_batches(cfg, split='val', global_batch_size=8)
  cfg.val_examples = 1437
  with pytest.raises(ValueError, match=r'data.val_examples=1437 must be in \[0, 1437\)'):
    data.get_info(cfg)


# ---------------------------------------------------------------------------------------------------------
# the official Spikformer recipe's pieces: crop scale/ratio, the SNN RandAugment set, erasing, bicubic, crop_pct


def test_random_resized_crop_scale_and_ratio():
  rng = np.random.default_rng(0)
  # Scale 1, ratio 1 on a square image: the whole image (the official CIFAR crop, i.e. no crop).
  for _ in range(20):
    assert augment.random_resized_crop_box(rng, 32, 32, 1.0, 1.0, (1.0, 1.0)) == (0.0, 0.0, 32.0, 32.0)
  # Scale 1 on a 4:3 image cannot fit a draw: torchvision's fallback, the image with its ratio clamped.
  assert augment.random_resized_crop_box(rng, 300, 400, 1.0, 1.0, (1.0, 1.0)) == (50.0, 0.0, 350.0, 300.0)
  assert augment.random_resized_crop_box(rng, 300, 400, 1.0, 1.0, (3 / 4, 4 / 3)) == (0.0, 0.0, 400.0, 300.0)
  for _ in range(200):
    left, top, right, bottom = augment.random_resized_crop_box(rng, 100, 100, 0.2, 0.5, (0.5, 2.0))
    area, ratio = (right - left) * (bottom - top) / 1e4, (right - left) / (bottom - top)
    assert 0.2 - 1e-9 <= area <= 0.5 + 1e-9 and 0.5 - 1e-9 <= ratio <= 2.0 + 1e-9
  with pytest.raises(ValueError, match='rrc_min_scale <= rrc_max_scale'):
    augment.random_resized_crop_box(rng, 10, 10, 0.9, 0.5)
  image = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
  aug = _config(crop_padding=0, random_resized_crop=True, rrc_min_scale=1.0, rrc_max_scale=1.0,
                rrc_min_ratio=1.0, rrc_max_ratio=1.0).augment
  out = augment.train_example(image, np.random.default_rng(0), size=32, aug=aug, method='bicubic')
  np.testing.assert_array_equal(out, augment.to_float(image))


def test_spikformer_randaugment_set_probability_and_magnitude_std():
  assert augment.RANDAUGMENT_OP_SETS['spikformer_official'] == ('equalize', 'rotate', 'shear_x', 'translate_x',
                                                       'translate_y')
  rgb = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
  # The defaults draw what they drew before the options existed.
  np.testing.assert_array_equal(augment.randaugment(rgb, np.random.default_rng(5), 2, 9),
                                augment.randaugment(rgb, np.random.default_rng(5), 2, 9, op_set='dtvit', prob=1.0,
                                                    magnitude_std=0.0))
  unchanged = [np.array_equal(augment.randaugment(rgb, np.random.default_rng(i), 1, 9, op_set='spikformer_official',
                                                  prob=0.5), rgb) for i in range(400)]
  assert 0.4 < np.mean(unchanged) < 0.6  # one op, applied half the time (every op of the set changes this image)
  calls = []
  ops = augment._OPS
  saved = dict(ops)
  try:
    for name in saved:
      ops[name] = lambda img, lv, sg, fill, name=name: calls.append((name, lv)) or img
    for i in range(2000):
      augment.randaugment(rgb, np.random.default_rng(i), 1, 9, op_set='spikformer_official', magnitude_std=0.4)
  finally:
    ops.update(saved)
  assert {n for n, _ in calls} == set(augment.RANDAUGMENT_OP_SETS['spikformer_official'])
  levels = np.array([lv for _, lv in calls]) * 10
  assert abs(levels.mean() - 9) < 0.05 and abs(levels.std() - 0.4) < 0.05  # N(9, 0.4), rarely clipped at 10
  with pytest.raises(ValueError, match="randaugment_op_set='timm'; choose one of dtvit, spikformer_official"):
    augment.randaugment(rgb, np.random.default_rng(0), 1, 9, op_set='timm')


def test_random_erasing_blanks_one_box_to_the_mean():
  rng = np.random.default_rng(0)
  image = rng.random((32, 32, 3), dtype=np.float32) + 2.0  # no pixel equals the fill value
  mean = np.array([0.1, 0.2, 0.3], np.float32)
  erased, fractions = 0, []
  for i in range(1000):
    out = augment.random_erase(image, np.random.default_rng(i), 0.25, mean)
    blank = np.all(out == mean, axis=-1)
    if blank.any():
      erased += 1
      rows, cols = np.where(blank)
      box = blank[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
      assert box.all()  # one rectangle, everything else untouched
      np.testing.assert_array_equal(out[~blank], image[~blank])
      fractions.append(box.size / blank.size)
    else:
      np.testing.assert_array_equal(out, image)
  assert 200 < erased < 300  # p = 0.25
  assert 0.015 < min(fractions) and max(fractions) < 0.36  # area in [0.02, 1/3] up to rounding of the sides
  aug = _config(crop_padding=0, random_erasing=1.0).augment
  with pytest.raises(ValueError, match='needs the dataset mean'):
    augment.train_example(image, np.random.default_rng(0), size=32, aug=aug)
  cfg = _config(crop_padding=0, random_erasing=1.0)
  b = next(data.train_batches(cfg, global_batch_size=32, seed=0))
  assert (b['image'] == 0).all(axis=-1).any(axis=(1, 2)).mean() > 0.5  # erased to the mean = 0 once normalised


def test_bicubic_resize_and_eval_crop_pct():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
  full = augment.eval_example(image, size=30, method='bicubic', variable_size=True, crop_pct=1.0)
  want = np.asarray(Image.fromarray(image).resize((30, 30), Image.BICUBIC, box=(10, 0, 70, 60)))
  np.testing.assert_array_equal(full, want / np.float32(255))
  default = augment.eval_example(image, size=30, method='bicubic', variable_size=True)
  want = np.asarray(Image.fromarray(image).resize((30, 30), Image.BICUBIC, box=(13.75, 3.75, 66.25, 56.25)))
  np.testing.assert_array_equal(default, want / np.float32(255))
  assert not np.array_equal(full, default)
  with pytest.raises(ValueError, match=r'eval_crop_pct must be in \(0, 1\]'):
    augment.eval_example(image, size=30, variable_size=True, crop_pct=1.5)
  gray = rng.random((8, 8, 1), dtype=np.float32)
  assert not np.array_equal(augment.resize(gray, 12, 'bicubic'), augment.resize(gray, 12, 'bilinear'))
  cfg = _config()
  cfg.resize_method = 'lanczos'
  with pytest.raises(ValueError, match='valid choices: bilinear, nearest, bicubic'):
    data.get_info(cfg)
