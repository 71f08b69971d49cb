"""Per-example preprocessing and augmentation: pure functions of (image, rng), numpy and PIL, no dataset state.

Images are [H, W, C] numpy arrays: uint8 (tfds sources) or float32 in [0, 1] (digits). Train order, per example:
[random resized crop | central crop (variable-size sources) | resize to the model's side] -> RandAugment
(uint8 PIL ops) -> random crop of the zero-padded image (`shift`) -> horizontal flip -> per-channel
normalisation -> random erasing (a box set to the dataset mean: 0 after normalisation). Mixup and cutmix mix
pairs of examples, so they live on device (`dtvit.data.mixing`).
"""
from typing import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

RESIZE_METHODS = {'bilinear': Image.BILINEAR, 'nearest': Image.NEAREST, 'bicubic': Image.BICUBIC}
IMAGENET_CROP_FRACTION = 0.875  # default eval crop on variable-size images (data.eval_crop_pct)
# Random erasing (timm's RandomErasing defaults, which the Spikformer recipes use): area fraction and aspect.
ERASE_AREA = (0.02, 1 / 3)
ERASE_ASPECT = (0.3, 1 / 0.3)

Box = tuple[float, float, float, float]  # (left, top, right, bottom) in pixels


def to_uint8(image: np.ndarray) -> np.ndarray:
  if image.dtype == np.uint8:
    return image
  return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)


def to_float(image: np.ndarray) -> np.ndarray:
  """float32 in [0, 1] pixel units."""
  if image.dtype == np.uint8:
    return image.astype(np.float32) / 255.0
  return image.astype(np.float32)


def to_pil(image: np.ndarray) -> Image.Image:
  image = to_uint8(image)
  return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def from_pil(img: Image.Image, channels: int) -> np.ndarray:
  """uint8 [H, W, channels]."""
  return np.asarray(img, np.uint8).reshape(img.size[1], img.size[0], channels)


def resize(image: np.ndarray, size: int, method: str) -> np.ndarray:
  """[H, W, C] uint8 or float32 -> [size, size, C], same dtype."""
  resample = RESIZE_METHODS[method]
  if image.dtype == np.uint8:
    return from_pil(to_pil(image).resize((size, size), resample), image.shape[-1])
  # Float images resize channel by channel in PIL's 32-bit float mode, keeping full precision.
  channels = [np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c], np.float32)).resize((size, size),
                                                                                                 resample))
              for c in range(image.shape[-1])]
  return np.stack(channels, axis=-1)


def random_resized_crop_box(rng: np.random.Generator, height: int, width: int, min_scale: float,
                            max_scale: float = 1.0, ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Box:
  """Inception-style crop: area fraction in [min_scale, max_scale], aspect ratio w/h in `ratio` (log-uniform),
  up to 10 draws. When none fits, torchvision's fallback: the central crop of the whole image with its aspect
  ratio clamped into `ratio` (with ratio (1, 1): the central square)."""
  if not 0 < min_scale <= max_scale or not 0 < ratio[0] <= ratio[1]:
    raise ValueError(f'random resized crop: need 0 < rrc_min_scale <= rrc_max_scale and 0 < rrc_min_ratio <= '
                     f'rrc_max_ratio, got scale ({min_scale}, {max_scale}), ratio {tuple(ratio)}.')
  area = height * width
  for _ in range(10):
    target = area * rng.uniform(min_scale, max_scale)
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
    w, h = np.sqrt(target * aspect), np.sqrt(target / aspect)
    if w <= width and h <= height:
      left, top = rng.uniform(0, width - w), rng.uniform(0, height - h)
      return left, top, left + w, top + h
  w, h = float(width), float(height)
  if w / h < ratio[0]:
    h = w / ratio[0]
  elif w / h > ratio[1]:
    w = h * ratio[1]
  left, top = (width - w) / 2, (height - h) / 2
  return left, top, left + w, top + h


def center_crop_box(height: int, width: int, fraction: float) -> Box:
  """The central square of side fraction * min(height, width)."""
  side = min(height, width) * fraction
  left, top = (width - side) / 2, (height - side) / 2
  return left, top, left + side, top + side


def fit_size(image: np.ndarray, size: int, *, method: str, box: Box | None = None) -> np.ndarray:
  """[H, W, C] -> [size, size, C], same dtype: `box` resized to size x size (through uint8), or the whole
  image resized (returned as is when already that size)."""
  if box is None:
    return image if image.shape[:2] == (size, size) else resize(image, size, method)
  out = from_pil(to_pil(image).resize((size, size), RESIZE_METHODS[method], box=box), image.shape[-1])
  return out if image.dtype == np.uint8 else to_float(out)


def _affine(matrix) -> Callable:
  return lambda img, fill: img.transform(img.size, Image.AFFINE, matrix, resample=Image.BILINEAR, fillcolor=fill)


def _enhance(kind) -> Callable:
  return lambda img, lv, sg, fill: kind(img).enhance(1 + sg * 0.9 * lv)


# (name, op(img, level in [0, 1], sign, fill)); geometric ranges follow the RandAugment/timm conventions.
RANDAUGMENT_OPS: list[tuple[str, Callable]] = [
    ('identity', lambda img, lv, sg, fill: img),
    ('autocontrast', lambda img, lv, sg, fill: ImageOps.autocontrast(img)),
    ('equalize', lambda img, lv, sg, fill: ImageOps.equalize(img)),
    ('rotate', lambda img, lv, sg, fill: img.rotate(sg * 30.0 * lv, resample=Image.BILINEAR, fillcolor=fill)),
    ('solarize', lambda img, lv, sg, fill: ImageOps.solarize(img, threshold=int(round(256 - 256 * lv)))),
    ('posterize', lambda img, lv, sg, fill: ImageOps.posterize(img, max(1, 8 - int(round(4 * lv))))),
    ('color', _enhance(ImageEnhance.Color)),
    ('contrast', _enhance(ImageEnhance.Contrast)),
    ('brightness', _enhance(ImageEnhance.Brightness)),
    ('sharpness', _enhance(ImageEnhance.Sharpness)),
    ('shear_x', lambda img, lv, sg, fill: _affine((1, sg * 0.3 * lv, 0, 0, 1, 0))(img, fill)),
    ('shear_y', lambda img, lv, sg, fill: _affine((1, 0, 0, sg * 0.3 * lv, 1, 0))(img, fill)),
    ('translate_x', lambda img, lv, sg, fill: _affine((1, 0, sg * 0.45 * lv * img.size[0], 0, 1, 0))(img, fill)),
    ('translate_y', lambda img, lv, sg, fill: _affine((1, 0, 0, 0, 1, sg * 0.45 * lv * img.size[1]))(img, fill)),
]


# Named op sets: 'dtvit' all of RANDAUGMENT_OPS; 'spikformer_official' the SNN-specific set of the official Spikformer
# CIFAR recipe (ZK-Zhou/spikformer cifar10/aa_snn.py, `_RAND_INCREASING_TRANSFORMS`: Equalize, Rotate, ShearX,
# TranslateXRel, TranslateYRel).
RANDAUGMENT_OP_SETS = {
    'dtvit': tuple(name for name, _ in RANDAUGMENT_OPS),
    'spikformer_official': ('equalize', 'rotate', 'shear_x', 'translate_x', 'translate_y'),
}
_OPS = dict(RANDAUGMENT_OPS)


def check_op_set(op_set: str) -> tuple[str, ...]:
  if op_set not in RANDAUGMENT_OP_SETS:
    raise ValueError(f"data.augment.randaugment_op_set={op_set!r}; choose one of {', '.join(RANDAUGMENT_OP_SETS)}.")
  return RANDAUGMENT_OP_SETS[op_set]


def randaugment(image: np.ndarray, rng: np.random.Generator, num_ops: int, magnitude: float, *,
                op_set: str = 'dtvit', prob: float = 1.0, magnitude_std: float = 0.0) -> np.ndarray:
  """RandAugment: num_ops ops drawn uniformly with replacement from `op_set`; each is applied with probability
  `prob` at a magnitude ~ N(magnitude, magnitude_std) clipped to [0, 10] (timm's convention; std 0: exactly
  `magnitude`), with a random sign.

  image: [H, W, C] uint8 or float32 in [0, 1]; returns the same shape and dtype. The default arguments draw
  exactly what they drew before these options existed (op, then sign, per op).
  """
  names = check_op_set(op_set)
  channels = image.shape[-1]
  img = to_pil(image)
  fill = 128 if channels == 1 else (128,) * channels  # mid-grey where geometric ops uncover the border
  for k in rng.integers(len(names), size=num_ops):
    sign = 1.0 if rng.random() < 0.5 else -1.0
    if prob < 1.0 and rng.random() >= prob:
      continue
    m = rng.normal(magnitude, magnitude_std) if magnitude_std > 0 else magnitude
    img = _OPS[names[k]](img, float(np.clip(m, 0, 10)) / 10.0, sign, fill)
  out = from_pil(img, channels)
  return out if image.dtype == np.uint8 else to_float(out)


def erase_box(rng: np.random.Generator, height: int, width: int) -> tuple[int, int, int, int] | None:
  """The box random erasing blanks, (top, left, h, w) in pixels: area fraction uniform in ERASE_AREA, aspect
  log-uniform in ERASE_ASPECT, up to 10 draws (timm's RandomErasing); None when no draw fits."""
  area = height * width
  for _ in range(10):
    target = area * rng.uniform(*ERASE_AREA)
    aspect = np.exp(rng.uniform(np.log(ERASE_ASPECT[0]), np.log(ERASE_ASPECT[1])))
    h, w = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
    if 0 < h < height and 0 < w < width:
      return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
  return None


def random_erase(image: np.ndarray, rng: np.random.Generator, prob: float, value: np.ndarray) -> np.ndarray:
  """With probability `prob`, one box (`erase_box`) of the float image [H, W, C] set to `value` [C] (the dataset
  mean: 0 after normalisation, timm's 'const' mode); otherwise the image as is."""
  if prob <= 0 or rng.random() >= prob:
    return image
  box = erase_box(rng, *image.shape[:2])
  if box is None:
    return image
  top, left, h, w = box
  out = image.copy()
  out[top:top + h, left:left + w] = value
  return out


def shift(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
  """out[y, x] = image[y + dy, x + dx], zero outside: the crop at offset (pad + dy, pad + dx) of the image
  zero-padded by pad pixels, without building the padded copy."""
  height, width = image.shape[:2]
  out = np.zeros_like(image)
  out[max(0, -dy):height - max(0, dy), max(0, -dx):width - max(0, dx)] = \
      image[max(0, dy):height + min(0, dy), max(0, dx):width + min(0, dx)]
  return out


def train_example(image: np.ndarray, rng: np.random.Generator, *, size: int, aug, method: str = 'bilinear',
                  variable_size: bool = False, mean: np.ndarray | None = None,
                  eval_crop_pct: float = IMAGENET_CROP_FRACTION) -> np.ndarray:
  """One stored image -> float32 [size, size, C] in [0, 1] pixel units, augmented (not yet normalised).

  aug: the `data.augment` config (see `dtvit.data.pipeline.default_data_config`). variable_size: stored images
  differ in size (ImageNet): without a random resized crop each is centrally cropped, as in evaluation
  (`eval_crop_pct`). mean: [C] in [0, 1], the value random erasing writes (needed when it is on).
  """
  height, width = image.shape[:2]
  box = None
  if aug.random_resized_crop:
    box = random_resized_crop_box(rng, height, width, aug.rrc_min_scale, aug.get('rrc_max_scale', 1.0),
                                  (aug.get('rrc_min_ratio', 3 / 4), aug.get('rrc_max_ratio', 4 / 3)))
  elif variable_size:
    box = center_crop_box(height, width, eval_crop_pct)
  image = fit_size(image, size, method=method, box=box)
  if aug.randaugment_ops > 0:
    image = randaugment(image, rng, aug.randaugment_ops, aug.randaugment_magnitude,
                        op_set=aug.get('randaugment_op_set', 'dtvit'), prob=aug.get('randaugment_prob', 1.0),
                        magnitude_std=aug.get('randaugment_magnitude_std', 0.0))
  image = to_float(image)
  if aug.crop_padding > 0:
    dy, dx = rng.integers(-aug.crop_padding, aug.crop_padding + 1, size=2)
    image = shift(image, int(dy), int(dx))
  if aug.flip and rng.random() < 0.5:
    image = image[:, ::-1]
  if aug.get('random_erasing', 0.0) > 0:
    if mean is None:
      raise ValueError('random erasing needs the dataset mean (train_example(..., mean=...)).')
    image = random_erase(image, rng, aug.random_erasing, mean)
  return image


def eval_example(image: np.ndarray, *, size: int, method: str = 'bilinear', variable_size: bool = False,
                 crop_pct: float = IMAGENET_CROP_FRACTION) -> np.ndarray:
  """One stored image -> float32 [size, size, C] in [0, 1]: variable sizes: the central square of side
  crop_pct x the shorter side resized to size (timm's eval: resize the shorter side to size / crop_pct, centre
  crop size); fixed sizes: resized."""
  if not 0 < crop_pct <= 1:
    raise ValueError(f'data.eval_crop_pct must be in (0, 1], got {crop_pct}.')
  box = center_crop_box(*image.shape[:2], crop_pct) if variable_size else None
  return to_float(fit_size(image, size, method=method, box=box))


def normalise(image: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
  """(image - mean) / std per channel, float32; mean, std: float32 [C]."""
  return ((image - mean) / std).astype(np.float32)
