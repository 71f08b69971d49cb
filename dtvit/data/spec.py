"""What a trained model expects of an image, stored beside the run: `<workdir>/data_spec.json`.

  {"dataset": "digits", "image_shape": [8, 8, 1], "mean": [...], "std": [...], "resize_method": "bilinear",
   "center_crop": 0.0, "class_names": ["0", ..., "9"], "pixel_range": ...}

Training writes it (`write_spec`, from `train.run`) so that a run can be used without its data: `dtvit.load`'s
`preprocess`, `python -m dtvit.predict` and the export read it. A workdir from before the file existed gets the
spec recomputed from its config's data section (`read_spec`), which needs the data there.

An image becomes model input the way the evaluation pipeline makes it (`augment.eval_example`, then
`augment.normalise`): pixels in [0, 1] (uint8 / 255, float as given), a central crop of `center_crop` of the
shorter side when that is > 0 (ImageNet-style data of varying size), resized to image_shape's side, then
(x - mean) / std per channel.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from dtvit import storage
from dtvit.data import augment
from dtvit.data import sources

SPEC_FILE = 'data_spec.json'
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.ppm', '.webp')
PIXEL_RANGE = 'uint8 images are divided by 255, float images are taken as [0, 1]'


def class_names(data_cfg) -> list[str]:
  """The names of the classes in label order: '0'..'9' for the digits, the tfds label names otherwise (the
  CIFAR names; an image folder's class subfolder names, sorted)."""
  if data_cfg.name == 'digits':
    return [str(i) for i in range(10)]
  resolved = data_cfg.copy_and_resolve_references()
  resolved.archive = sources.resolve_path(data_cfg.archive, 'data.archive')
  resolved.data_dir = sources.resolve_path(data_cfg.data_dir, 'data.data_dir')
  builder = sources._tfds_builder(resolved)  # already prepared by `load`
  return [str(n) for n in builder.info.features['label'].names]


def data_spec(data_cfg) -> dict:
  """The spec of the configured data (loads it: prepares an image folder the first time)."""
  ds = sources.load(data_cfg)
  return {'dataset': ds.info.name, 'image_shape': [int(s) for s in ds.info.image_shape],
          'mean': [float(m) for m in ds.mean], 'std': [float(s) for s in ds.std],
          'resize_method': str(data_cfg.resize_method),
          'center_crop': float(data_cfg.get('eval_crop_pct', augment.IMAGENET_CROP_FRACTION)) if ds.variable_size
                         else 0.0,
          'class_names': class_names(data_cfg), 'pixel_range': PIXEL_RANGE}


def write_spec(workdir: str, data_cfg) -> dict:
  """Writes `<workdir>/data_spec.json` (process 0 only; atomically) and returns the spec."""
  import jax
  spec = data_spec(data_cfg)
  if jax.process_index() == 0:
    storage.makedirs(workdir)
    from dtvit import workdir as workdir_lib
    workdir_lib.write_json(storage.join(workdir, SPEC_FILE), spec)  # atomically and durably
  return spec


def read_spec(workdir: str, data_cfg=None) -> dict:
  """`<workdir>/data_spec.json`, or, for a run from before it existed, the spec recomputed from `data_cfg`
  (the run's `config.data`)."""
  path = storage.join(workdir, SPEC_FILE)
  if storage.isfile(path):
    from dtvit import workdir as workdir_lib
    return workdir_lib.read_json(path, expect=dict)  # damaged: one line naming the file and the fix
  if data_cfg is None:
    raise FileNotFoundError(f'{workdir} has no {SPEC_FILE}; pass the run\'s config.data to recompute it.')
  return data_spec(data_cfg)


def _one_image(image, spec: dict, index: int) -> np.ndarray:
  """One image [H, W] or [H, W, C] -> float32 [S, S, C] in [0, 1], as the evaluation pipeline sizes it."""
  S, _, C = spec['image_shape']
  x = np.asarray(image)
  if x.ndim == 2:
    x = x[..., None]
  if x.ndim != 3 or x.shape[-1] != C:
    raise ValueError(f'Image {index} has shape {x.shape}; this model takes [H, W, {C}] images '
                     f'({"grey" if C == 1 else "RGB"}), any H and W.')
  if x.dtype != np.uint8:
    x = x.astype(np.float32)
  crop = spec['center_crop']
  return augment.eval_example(x, size=S, method=spec['resize_method'], variable_size=crop > 0,
                              **({'crop_pct': crop} if crop > 0 else {}))


def preprocess(spec: dict, images) -> np.ndarray:
  """Raw images -> the model's input, float32 [B, S, S, C] normalised (see the module docstring).

  images: one image [H, W(, C)], a batch [B, H, W, C], or a sequence of images of any sizes; uint8 in
  [0, 255] or float in [0, 1]."""
  if hasattr(images, 'shape'):
    array = np.asarray(images)
    batch: Sequence = list(array) if array.ndim == 4 else [array]
  else:
    batch = list(images)
  if not batch:
    raise ValueError('preprocess: no images given.')
  x = np.stack([_one_image(im, spec, i) for i, im in enumerate(batch)])
  return augment.normalise(x, np.asarray(spec['mean'], np.float32), np.asarray(spec['std'], np.float32))


def read_image(path: str, channels: int) -> np.ndarray:
  """uint8 [H, W, channels] of an image file (converted to grey for 1 channel, RGB for 3)."""
  from PIL import Image
  try:
    with Image.open(path) as img:
      img = img.convert('L' if channels == 1 else 'RGB')
      return np.asarray(img, np.uint8).reshape(img.size[1], img.size[0], channels)
  except (OSError, ValueError) as e:
    raise ValueError(f'Cannot read image file {path}: {e}') from e


def class_folder_files(root: str, names: Sequence[str]) -> tuple[list[str], list[int]]:
  """(image paths, labels) of a folder laid out `<root>/<class name>/<image>`, the class names those of the
  run (`spec['class_names']`); an unknown subfolder is an error."""
  if not os.path.isdir(root):
    raise FileNotFoundError(f'--images={root} is not a folder; give a folder with one subfolder per class.')
  label_of = {n: i for i, n in enumerate(names)}
  files, labels = [], []
  for sub in sorted(os.listdir(root)):
    if not os.path.isdir(os.path.join(root, sub)) or sub.startswith('.'):
      continue
    if sub not in label_of:
      raise ValueError(f"Subfolder '{sub}' of {root} is not one of the run's classes {list(names)}; name the "
                       'class subfolders after them.')
    for name in sorted(os.listdir(os.path.join(root, sub))):
      if not name.startswith('.') and name.lower().endswith(IMAGE_EXTENSIONS):
        files.append(os.path.join(root, sub, name))
        labels.append(label_of[sub])
  if not files:
    raise ValueError(f'{root} holds no images in class subfolders (<class>/<image>, extensions '
                     f'{", ".join(IMAGE_EXTENSIONS)}).')
  return files, labels
