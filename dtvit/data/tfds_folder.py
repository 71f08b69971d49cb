"""TensorFlow-free tfds datasets: image folders/archives prepared as ArrayRecord, and stock builders.

Two kinds of tfds data reach `dtvit.data.sources`, both read with random access through
`builder.as_data_source(split)` (ArrayRecord files, no TensorFlow):

* `folder_builder`: a folder or tar archive laid out `<split>/<class>/<image>` (split in train/test, classes
  sorted alphabetically give the label ids; any leading folders before `<split>` are ignored) is prepared
  once by `ImageFolderArrays`, a `GeneratorBasedBuilder` whose image feature is a fixed-shape
  `tfds.features.Tensor(uint8)` stored as raw bytes. Encoding a `Tensor` feature and writing ArrayRecord need no
  TensorFlow, whereas `tfds.features.Image` encoding would. Later calls find `dataset_info.json` and reopen the prepared
  files without touching the archive.
* `stock_builder`: `cifar10`, `cifar100`, `imagenet2012` that the user prepared elsewhere with
  `tfds build <name> --file_format=array_record` and copied into the data_dir. Their `Image` features are
  decoded by tfds's numpy path (`Image.decode_example_np`, PIL), so reading needs no TensorFlow either;
  preparing them does (and needs the internet or, for ImageNet, the manual ILSVRC tars).
"""
import dataclasses
import io
import os
import pathlib
import re
import tarfile

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

SPLITS = ('train', 'test')
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.ppm', '.webp')
FOLDER_BUILDER_NAME = 'image_folder_arrays'
FOLDER_BUILDER_VERSION = '1.0.0'


def resolve_data_dir(data_dir: str) -> str:
  """'' means the tfds default: $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  data_dir = data_dir or os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets'
  return os.path.abspath(os.path.expanduser(data_dir))


def _split_and_class(path: str) -> tuple[str, str] | None:
  """('train', 'cat') for '.../train/cat/0001.jpg'; None for anything that is not an image in that layout."""
  parts = pathlib.PurePosixPath(path).parts
  if len(parts) < 3 or parts[-3] not in SPLITS:
    return None
  if parts[-1].startswith('.') or not parts[-1].lower().endswith(IMAGE_EXTENSIONS):
    return None  # hidden files include macOS '._x.jpg' resource forks, which are not images
  return parts[-3], parts[-2]


class ImageFiles:
  """The images of a folder or tar archive in `<split>/<class>/<image>` layout, indexed once.

  A tar archive's headers are parsed once here (a Python-heavy pass); reading the images of one split later
  walks the archive forward in stored order, so a .tar.gz is decompressed once per split and never unpacked.
  """

  def __init__(self, source: str):
    self.source = source
    self._tar = None
    self.entries = []  # (path inside source, split, class, tar member or file path), in stored order
    if os.path.isdir(source):
      for root, dirs, files in os.walk(source):
        dirs.sort()
        for name in sorted(files):
          full = os.path.join(root, name)
          rel = os.path.relpath(full, source).replace(os.sep, '/')
          if (parsed := _split_and_class(rel)) is not None:
            self.entries.append((rel, *parsed, full))
    else:
      self._tar = tarfile.open(source, 'r:*')
      for member in self._tar.getmembers():
        if member.isfile() and (parsed := _split_and_class(member.name)) is not None:
          self.entries.append((member.name, *parsed, member))

  def read(self, handle) -> bytes:
    if self._tar is None:
      with open(handle, 'rb') as f:
        return f.read()
    return self._tar.extractfile(handle).read()

  def close(self):
    if self._tar is not None:
      self._tar.close()


def decode_image(data: bytes, *, name: str, source: str, size: int, exact_size: bool,
                 resize: bool = True) -> np.ndarray:
  """uint8 [size, size, 3] RGB from encoded bytes (native size if not resize); errors name the file."""
  try:
    with Image.open(io.BytesIO(data)) as img:
      img.load()  # decode now: a truncated file fails here rather than later, far from its name
      img = img.convert('RGB')
  except (OSError, SyntaxError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
    raise ValueError(f"Cannot decode image file '{name}' in {source}: {e}") from e
  if resize and img.size != (size, size):
    if exact_size:
      raise ValueError(
          f"Image file '{name}' in {source} is {img.size[0]}x{img.size[1]}, expected {size}x{size}. "
          "Use data.name='image_folder' with data.image_size=<side> to resize images while preparing.")
    img = img.resize((size, size), Image.BILINEAR)
  return np.asarray(img, dtype=np.uint8)


@dataclasses.dataclass(eq=False)
class FolderConfig(tfds.core.BuilderConfig):
  """One prepared copy of one folder/archive at one stored image side."""
  source: str = ''
  class_names: tuple[str, ...] = ()
  image_size: int = 0
  exact_size: bool = False  # True: a differently sized image is an error (CIFAR-style data); False: resize


class ImageFolderArrays(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """`<split>/<class>/<image>` images stored as uint8 [S, S, 3] tensors with integer labels.

  Built only to prepare (`folder_builder`); reading goes through `tfds.builder_from_directory`, which needs
  neither this class nor the source files.
  """

  name = FOLDER_BUILDER_NAME
  VERSION = tfds.core.Version(FOLDER_BUILDER_VERSION)

  def __init__(self, *, files: ImageFiles, **kwargs):
    self._files = files
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    return tfds.core.DatasetInfo(
        builder=self,
        description=f'Images from {cfg.source}, classes {list(cfg.class_names)}.',
        features=tfds.features.FeaturesDict({
            # Raw bytes: the default encoding writes one int64 per pixel, 2x slower to prepare and read.
            'image': tfds.features.Tensor(shape=(cfg.image_size, cfg.image_size, 3), dtype=np.uint8,
                                          encoding=tfds.features.Encoding.BYTES),
            'label': tfds.features.ClassLabel(names=list(cfg.class_names)),
        }),
        supervised_keys=('image', 'label'),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # the data is local
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(self, split: str):
    cfg = self.builder_config
    label_of = {c: i for i, c in enumerate(cfg.class_names)}
    for name, file_split, cls, handle in self._files.entries:
      if file_split != split:
        continue
      if cls not in label_of:
        raise ValueError(f"Image file '{name}' in {cfg.source}: class folder '{cls}' has no train images, "
                         f'so it has no label (train classes: {list(cfg.class_names)}).')
      image = decode_image(self._files.read(handle), name=name, source=cfg.source, size=cfg.image_size,
                           exact_size=cfg.exact_size)
      yield name, {'image': image, 'label': label_of[cls]}


def _slug(text: str) -> str:
  return re.sub(r'[^a-z0-9]+', '_', text.lower()).strip('_') or 'data'


def folder_config_name(source: str, image_size: int) -> str:
  """Prepared-copy name: archive/folder base name and stored side, e.g. 'cifar10_jpg_32'."""
  base = os.path.basename(os.path.normpath(source))
  for ext in ('.tar.gz', '.tgz', '.tar.bz2', '.tar.xz', '.tar'):
    if base.lower().endswith(ext):
      base = base[:-len(ext)]
      break
  return f"{_slug(base)}_{image_size or 'native'}"


def folder_builder(source: str, *, data_dir: str, image_size: int = 0,
                   exact_size: bool = False) -> tfds.core.DatasetBuilder:
  """Returns a prepared builder for the `<split>/<class>/<image>` folder or archive `source`.

  Prepares it into `data_dir/image_folder_arrays/<config>/1.0.0` the first time (ArrayRecord, no TF);
  afterwards reopens that copy without reading `source`. image_size: stored side S (images are resized
  to S x S, or rejected when exact_size); 0 = the side of the first train image.
  To re-prepare after changing the archive, delete that folder.
  """
  if not source:
    raise ValueError("No image source: set data.archive to a .tar.gz/.tar archive or a folder laid out "
                     "train/<class>/*.jpg, test/<class>/*.jpg.")
  source = os.path.abspath(os.path.expanduser(source))
  data_dir = resolve_data_dir(data_dir)
  config_name = folder_config_name(source, image_size)
  prepared = os.path.join(data_dir, FOLDER_BUILDER_NAME, config_name, FOLDER_BUILDER_VERSION)
  if os.path.exists(os.path.join(prepared, 'dataset_info.json')):
    return tfds.builder_from_directory(prepared)
  if not os.path.exists(source):
    raise FileNotFoundError(f'data.archive={source} does not exist (and no prepared copy at {prepared}).')

  files = ImageFiles(source)
  try:
    classes = tuple(sorted({cls for _, split, cls, _ in files.entries if split == 'train'}))
    counts = {split: sum(e[1] == split for e in files.entries) for split in SPLITS}
    if not all(counts.values()):
      raise ValueError(f'{source} has {counts} images in train/<class>/ and test/<class>/ folders; '
                       'both splits need images (extensions ' + ', '.join(IMAGE_EXTENSIONS) + ').')
    if not image_size:
      first = next(e for e in files.entries if e[1] == 'train')
      image_size = max(decode_image(files.read(first[3]), name=first[0], source=source, size=0,
                                    exact_size=False, resize=False).shape[:2])
    config = FolderConfig(name=config_name, version=FOLDER_BUILDER_VERSION, source=source,
                          class_names=classes, image_size=image_size, exact_size=exact_size,
                          description=f'Prepared from {source}')
    builder = ImageFolderArrays(files=files, config=config, data_dir=data_dir, file_format='array_record')
    # No GCS probe: machines here reach package registries only, and the data is local anyway.
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  finally:
    files.close()
  return tfds.builder_from_directory(prepared)  # the same reader a later call gets


def stock_builder(name: str, *, data_dir: str) -> tfds.core.DatasetBuilder:
  """A stock tfds builder that is already prepared in data_dir, or an error saying how to provide one."""
  data_dir = resolve_data_dir(data_dir)
  builder = tfds.builder(name, data_dir=data_dir)
  if not builder.is_prepared():
    folder = ("data.name='image_folder' with data.archive=<.tar.gz or folder of train/<class>/*.jpg, "
              'test/<class>/*.jpg> and data.image_size')
    local = ("data.name='cifar10_local' with data.archive=<.tar.gz or folder of train/<class>/*.jpg, "
             "test/<class>/*.jpg> (e.g. ../shared/data/cifar10-jpg.tar.gz), or " + folder
             if name == 'cifar10' else folder)
    manual = (' (imagenet2012 also needs ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in '
              '<dir>/downloads/manual)' if name == 'imagenet2012' else '')
    raise FileNotFoundError(
        f"tfds dataset '{name}' is not prepared in data.data_dir={data_dir} (looked for {builder.data_path}), "
        'and this machine cannot download it. Either use ' + local + '; or, on a machine with internet, run '
        f'`tfds build {name} --data_dir=<dir> --file_format=array_record`{manual} and copy <dir>/{name} '
        'into data.data_dir.')
  return builder


def data_source(builder: tfds.core.DatasetBuilder, split: str):
  """Random-access source of {'image', 'label', ...} dicts; explains the fix when files are TFRecord."""
  try:
    return builder.as_data_source(split)
  except NotImplementedError as e:
    raise RuntimeError(
        f"tfds dataset '{builder.name}' in {builder.data_dir} was prepared as TFRecord, which has no random "
        'access without TensorFlow. Rebuild it with `tfds build '
        f'{builder.name} --file_format=array_record` and copy the result into data.data_dir.') from e
