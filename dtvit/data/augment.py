"""Per-example preprocessing and augmentation: pure functions of (image, rng), numpy and PIL, no dataset state.

Images are [H, W, C] numpy arrays: uint8 (tfds sources) or float32 in [0, 1] (digits). Train order, per example:
[random resized crop | central crop (variable-size sources) | resize to the model's side] -> RandAugment
(uint8 PIL ops) -> random crop of the zero-padded image (`shift`) -> horizontal flip -> per-channel
normalisation. Mixup and cutmix mix pairs of examples, so they live on device (`dtvit.data.mixing`).
"""
from typing import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

RESIZE_METHODS = {'bilinear': Image.BILINEAR, 'nearest': Image.NEAREST}
IMAGENET_CROP_FRACTION = 0.875  # eval on variable-size images: central crop of 87.5% of the shorter side

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
  channels = [np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c], np.float32)).resize((size, size), resample))
              for c in range(image.shape[-1])]
  return np.stack(channels, axis=-1)


def random_resized_crop_box(rng: np.random.Generator, height: int, width: int, min_scale: float) -> Box:
  """Area fraction in [min_scale, 1], aspect ratio in [3/4, 4/3] (log-uniform); Inception-style."""
  area = height * width
  for _ in range(10):
    target = area * rng.uniform(min_scale, 1.0)
    ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    w, h = np.sqrt(target * ratio), np.sqrt(target / ratio)
    if w <= width and h <= height:
      left, top = rng.uniform(0, width - w), rng.uniform(0, height - h)
      return left, top, left + w, top + h
  return center_crop_box(height, width, 1.0)  # rare fallback: the central square


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


def randaugment(image: np.ndarray, rng: np.random.Generator, num_ops: int, magnitude: float) -> np.ndarray:
  """RandAugment: num_ops ops drawn uniformly with replacement, each at `magnitude` (0..10) with a random sign.

  image: [H, W, C] uint8 or float32 in [0, 1]; returns the same shape and dtype.
  """
  channels = image.shape[-1]
  img = to_pil(image)
  fill = 128 if channels == 1 else (128,) * channels  # mid-grey where geometric ops uncover the border
  level = float(np.clip(magnitude, 0, 10)) / 10.0
  for k in rng.integers(len(RANDAUGMENT_OPS), size=num_ops):
    sign = 1.0 if rng.random() < 0.5 else -1.0
    img = RANDAUGMENT_OPS[k][1](img, level, sign, fill)
  out = from_pil(img, channels)
  return out if image.dtype == np.uint8 else to_float(out)


def shift(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
  """out[y, x] = image[y + dy, x + dx], zero outside: the crop at offset (pad + dy, pad + dx) of the image
  zero-padded by pad pixels, without building the padded copy."""
  height, width = image.shape[:2]
  out = np.zeros_like(image)
  out[max(0, -dy):height - max(0, dy), max(0, -dx):width - max(0, dx)] = \
      image[max(0, dy):height + min(0, dy), max(0, dx):width + min(0, dx)]
  return out


def train_example(image: np.ndarray, rng: np.random.Generator, *, size: int, aug, method: str = 'bilinear',
                  variable_size: bool = False) -> np.ndarray:
  """One stored image -> float32 [size, size, C] in [0, 1] pixel units, augmented (not yet normalised).

  aug: the `data.augment` config (crop_padding, flip, random_resized_crop, rrc_min_scale, randaugment_ops,
  randaugment_magnitude). variable_size: stored images differ in size (ImageNet): without a random resized
  crop each is centrally cropped, as in evaluation.
  """
  height, width = image.shape[:2]
  box = None
  if aug.random_resized_crop:
    box = random_resized_crop_box(rng, height, width, aug.rrc_min_scale)
  elif variable_size:
    box = center_crop_box(height, width, IMAGENET_CROP_FRACTION)
  image = fit_size(image, size, method=method, box=box)
  if aug.randaugment_ops > 0:
    image = randaugment(image, rng, aug.randaugment_ops, aug.randaugment_magnitude)
  image = to_float(image)
  if aug.crop_padding > 0:
    dy, dx = rng.integers(-aug.crop_padding, aug.crop_padding + 1, size=2)
    image = shift(image, int(dy), int(dx))
  if aug.flip and rng.random() < 0.5:
    image = image[:, ::-1]
  return image


def eval_example(image: np.ndarray, *, size: int, method: str = 'bilinear', variable_size: bool = False) -> np.ndarray:
  """One stored image -> float32 [size, size, C] in [0, 1]: central crop (variable sizes) or resize."""
  box = center_crop_box(*image.shape[:2], IMAGENET_CROP_FRACTION) if variable_size else None
  return to_float(fit_size(image, size, method=method, box=box))


def normalise(image: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
  """(image - mean) / std per channel, float32; mean, std: float32 [C]."""
  return ((image - mean) / std).astype(np.float32)
