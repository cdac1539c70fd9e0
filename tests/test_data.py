"""Tests of cerdeq_jax.data: readers on small files written in the real formats,
normalisation, augmentation, the deterministic/resumable batch iterator."""
import gzip
import os
import shutil
import struct
import tarfile
import threading

import numpy as np
import pytest

from cerdeq_jax import data
from cerdeq_jax.data import datasets as datasets_lib
from cerdeq_jax.data import pipeline
from cerdeq_jax.data.tiny_imagenet import read_source

REAL_FASHION_MNIST = '/usr/share/datasets/fashion-mnist'


@pytest.fixture(autouse=True)
def _isolate_search_paths(monkeypatch, tmp_path):
  """Keep every loader away from real data unless a test points at it."""
  monkeypatch.delenv(datasets_lib.DATA_DIR_ENV, raising=False)
  monkeypatch.setattr(datasets_lib, 'SYSTEM_FASHION_MNIST_DIR', str(tmp_path / 'none'))
  monkeypatch.setattr(datasets_lib, 'TFDS_MANUAL_DIR', str(tmp_path / 'none'))


def _rng(seed=0):
  return np.random.default_rng(seed)


# ------------------------------------------------------------------------ IDX

def _idx_bytes(array: np.ndarray, code: int) -> bytes:
  """IDX written by hand: magic, big-endian dims, big-endian payload."""
  header = bytes([0, 0, code, array.ndim]) + struct.pack(f'>{array.ndim}I', *array.shape)
  return header + array.astype(array.dtype.newbyteorder('>')).tobytes()


def _write(path, payload: bytes, compress: bool):
  with (gzip.open if compress else open)(path, 'wb') as f:
    f.write(payload)


@pytest.mark.parametrize('compress', [True, False])
def test_read_idx_uint8_images(tmp_path, compress):
  images = _rng().integers(0, 256, (5, 7, 3), dtype=np.uint8)
  path = tmp_path / 'x-idx3-ubyte'
  _write(path, _idx_bytes(images, 0x08), compress)
  out = data.read_idx(path)
  assert out.dtype == np.uint8 and out.shape == (5, 7, 3)
  np.testing.assert_array_equal(out, images)


def test_read_idx_multibyte_types_are_big_endian(tmp_path):
  ints = np.array([[1, -2, 70000]], np.int32)
  floats = np.array([0.5, -3.25], np.float32)
  _write(tmp_path / 'i', _idx_bytes(ints, 0x0C), False)
  _write(tmp_path / 'f', _idx_bytes(floats, 0x0D), True)
  np.testing.assert_array_equal(data.read_idx(tmp_path / 'i'), ints)
  np.testing.assert_array_equal(data.read_idx(tmp_path / 'f'), floats)
  assert data.read_idx(tmp_path / 'i').dtype.isnative


@pytest.mark.parametrize('payload, compress, match', [
    (b'\x01\x00\x08\x01' + struct.pack('>I', 2) + b'ab', False, 'magic'),
    (b'\x00\x00\x08\x01' + struct.pack('>I', 3) + b'ab', False, 'payload'),
    (b'\x00\x00\x08\x02' + struct.pack('>I', 3), True, 'header'),
    (b'\x00\x00', False, 'not an IDX'),
])
def test_read_idx_corrupt_file_is_one_line_value_error(tmp_path, payload, compress, match):
  path = tmp_path / 'bad-idx'
  _write(path, payload, compress)
  with pytest.raises(ValueError, match=match) as info:
    data.read_idx(path)
  assert '\n' not in str(info.value) and str(path) in str(info.value)


def test_read_idx_truncated_gzip(tmp_path):
  payload = gzip.compress(_idx_bytes(np.zeros((50, 50), np.uint8), 0x08))
  path = tmp_path / 'trunc.gz'
  path.write_bytes(payload[: len(payload) // 2])
  with pytest.raises(ValueError, match='gzip'):
    data.read_idx(path)


# -------------------------------------------------------------- Fashion-MNIST

def _write_fashion(folder, n_train=6, n_test=4, compress=True):
  folder.mkdir(parents=True, exist_ok=True)
  arrays = {}
  for prefix, n in (('train', n_train), ('t10k', n_test)):
    images = _rng(n).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) * 3 % 10).astype(np.uint8)
    suffix = '.gz' if compress else ''
    _write(folder / f'{prefix}-images-idx3-ubyte{suffix}', _idx_bytes(images, 0x08), compress)
    _write(folder / f'{prefix}-labels-idx1-ubyte{suffix}', _idx_bytes(labels, 0x08), compress)
    arrays[prefix] = images, labels
  return arrays


@pytest.mark.parametrize('compress', [True, False])
def test_fashion_mnist_reads_pixels_and_labels(tmp_path, compress):
  written = _write_fashion(tmp_path / 'fm', compress=compress)
  for split, prefix in (('train', 'train'), ('test', 't10k')):
    ds = data.fashion_mnist(split, data_dir=tmp_path / 'fm')
    images, labels = written[prefix]
    assert ds.images.shape == images.shape + (1,) and ds.images.dtype == np.uint8
    np.testing.assert_array_equal(ds.images[..., 0], images)
    assert ds.labels.dtype == np.int32
    np.testing.assert_array_equal(ds.labels, labels)
    assert (ds.num_classes, ds.mean, ds.std, ds.name) == (
        10, (0.2860,), (0.3530,), 'fashion_mnist')


def test_fashion_mnist_search_order(tmp_path, monkeypatch):
  _write_fashion(tmp_path / 'root' / 'fashion-mnist', n_train=3)
  # data_dir/fashion-mnist, and $CERDEQ_DATA_DIR/fashion-mnist.
  assert data.fashion_mnist('train', data_dir=tmp_path / 'root').num_examples == 3
  monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / 'root'))
  assert data.load('fashion-mnist', 'train').num_examples == 3


def test_fashion_mnist_missing_is_one_line_with_instructions(tmp_path):
  with pytest.raises(FileNotFoundError) as info:
    data.fashion_mnist('test', data_dir=tmp_path)
  msg = str(info.value)
  assert '\n' not in msg
  assert 'apt-get install dataset-fashion-mnist' in msg and '--data_dir' in msg


def test_real_fashion_mnist_test_set():
  if not os.path.isfile(os.path.join(REAL_FASHION_MNIST, 't10k-images-idx3-ubyte.gz')):
    pytest.skip(f'{REAL_FASHION_MNIST} absent (apt-get install dataset-fashion-mnist)')
  ds = data.fashion_mnist('test', data_dir=REAL_FASHION_MNIST)
  assert ds.images.shape == (10000, 28, 28, 1) and ds.images.dtype == np.uint8
  assert ds.num_classes == 10
  np.testing.assert_array_equal(np.bincount(ds.labels), np.full(10, 1000))


def test_fashion_mnist_constants_match_real_training_set():
  if not os.path.isfile(os.path.join(REAL_FASHION_MNIST, 'train-images-idx3-ubyte.gz')):
    pytest.skip(f'{REAL_FASHION_MNIST} absent (apt-get install dataset-fashion-mnist)')
  images = data.fashion_mnist('train', data_dir=REAL_FASHION_MNIST).images
  x = images.reshape(-1).astype(np.float64) / 255
  assert abs(x.mean() - data.FASHION_MNIST_MEAN[0]) < 1e-4
  assert abs(x.std() - data.FASHION_MNIST_STD[0]) < 1e-4


# ------------------------------------------------------------------- CIFAR-10

def _cifar_record(label: int, image_hwc: np.ndarray) -> bytes:
  # The documented layout: label byte, then the R, G, B planes, each row-major.
  return bytes([label]) + b''.join(image_hwc[:, :, c].tobytes() for c in range(3))


def _write_cifar(root, per_file=2):
  """Writes cifar-10-batches-bin/ under root; returns {split: (images, labels)}."""
  folder = root / 'cifar-10-batches-bin'
  folder.mkdir(parents=True)
  files = {'train': [f'data_batch_{i}.bin' for i in range(1, 6)], 'test': ['test_batch.bin']}
  written = {}
  for split, names in files.items():
    images, labels = [], []
    for k, name in enumerate(names):
      imgs = _rng(hash(name) % 1000).integers(0, 256, (per_file, 32, 32, 3), dtype=np.uint8)
      labs = [(k + j) % 10 for j in range(per_file)]
      (folder / name).write_bytes(b''.join(_cifar_record(l, im) for l, im in zip(labs, imgs)))
      images.append(imgs)
      labels += labs
    written[split] = np.concatenate(images), np.array(labels)
  return folder, written


def test_cifar10_from_folder_and_tar_gz_hwc(tmp_path):
  folder, written = _write_cifar(tmp_path / 'extracted')
  with tarfile.open(tmp_path / 'cifar-10-binary.tar.gz', 'w:gz') as tar:
    tar.add(folder, arcname='cifar-10-batches-bin')
  for kwargs in ({'data_dir': tmp_path / 'extracted'},         # folder containing it
                 {'data_dir': folder},                          # the folder itself
                 {'manual_dir': tmp_path}):                     # the tar.gz
    for split in ('train', 'test'):
      ds = data.cifar10(split, **kwargs)
      images, labels = written[split]
      assert ds.images.shape == images.shape and ds.images.flags.c_contiguous
      np.testing.assert_array_equal(ds.images, images)
      np.testing.assert_array_equal(ds.labels, labels)
      assert ds.labels.dtype == np.int32
      assert (ds.num_classes, ds.mean, ds.std) == (10, data.CIFAR10_MEAN, data.CIFAR10_STD)
  assert written['train'][0].shape[0] == 10


def test_cifar10_pixel_orientation(tmp_path):
  """One hand-made image: red varies along rows, green along columns."""
  folder = tmp_path / 'cifar-10-batches-bin'
  folder.mkdir()
  r = np.repeat(np.arange(32, dtype=np.uint8)[:, None], 32, axis=1)  # R[y, x] = y
  g = r.T                                                             # G[y, x] = x
  b = np.full((32, 32), 200, np.uint8)
  record = bytes([7]) + r.tobytes() + g.tobytes() + b.tobytes()
  for name in [f'data_batch_{i}.bin' for i in range(1, 6)] + ['test_batch.bin']:
    (folder / name).write_bytes(record)
  ds = data.cifar10('test', data_dir=tmp_path)
  assert ds.images[0, 5, 9].tolist() == [5, 9, 200] and ds.labels[0] == 7


def test_cifar10_missing_and_corrupt(tmp_path):
  with pytest.raises(FileNotFoundError) as info:
    data.cifar10('train', data_dir=tmp_path)
  assert '\n' not in str(info.value) and 'cifar-10-binary.tar.gz' in str(info.value)
  folder, _ = _write_cifar(tmp_path / 'c')
  with open(folder / 'test_batch.bin', 'ab') as f:
    f.write(b'\x00')
  with pytest.raises(ValueError, match='multiple'):
    data.cifar10('test', data_dir=folder)


def test_cifar10_falls_back_to_tfds_prepared_copy(tmp_path, monkeypatch):
  """No binary files, but an ArrayRecord cifar10 prepared by tfds elsewhere."""
  tfds = pytest.importorskip('tensorflow_datasets')
  images = _rng(4).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
  records = [{'id': f'test_{i:05d}'.encode(), 'image': images[i], 'label': i % 10}
             for i in range(6)]
  shuffled = [records[j] for j in (3, 0, 5, 1, 4, 2)]  # tfds shuffles on write

  def as_data_source(builder, split, **kwargs):
    assert builder.name == 'cifar10' and split == 'test'
    return shuffled
  monkeypatch.setattr(tfds.core.DatasetBuilder, 'is_prepared', lambda self: True)
  with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE,
                              as_data_source_fn=as_data_source):
    ds = data.cifar10('test', data_dir=tmp_path)
  np.testing.assert_array_equal(ds.images, images)  # original order restored
  np.testing.assert_array_equal(ds.labels, np.arange(6))


# -------------------------------------------------------------- Tiny-ImageNet

WNIDS = ['n0300', 'n0100', 'n0200']  # deliberately unsorted, as in the real file


def _tiny_image(seed: int) -> np.ndarray:
  """Blocky 64x64 RGB image (survives JPEG) with an asymmetric layout."""
  colours = _rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
  return np.kron(colours, np.ones((16, 16, 1), np.uint8))


def _write_tiny(root, per_class=2):
  """Writes a tiny-imagenet-200/ layout; returns {split: [(path, label, image)]}."""
  from PIL import Image
  base = root / 'tiny-imagenet-200'
  (base / 'val' / 'images').mkdir(parents=True)
  (base / 'wnids.txt').write_text('\n'.join(WNIDS) + '\n')
  ids = {w: i for i, w in enumerate(sorted(WNIDS))}
  written = {'train': [], 'test': []}
  for w in sorted(WNIDS):
    (base / 'train' / w / 'images').mkdir(parents=True)
    (base / 'train' / w / f'{w}_boxes.txt').write_text('')
    for j in range(per_class):
      path = base / 'train' / w / 'images' / f'{w}_{j}.JPEG'
      image = _tiny_image(ids[w] * 10 + j)
      Image.fromarray(image).save(path, quality=95, subsampling=0)
      written['train'].append((path, ids[w], image))
  # Validation: one greyscale JPEG among them; annotation order is canonical.
  lines = []
  for k, w in enumerate(['n0200', 'n0300', 'n0100', 'n0200']):
    path = base / 'val' / 'images' / f'val_{k}.JPEG'
    image = _tiny_image(100 + k)
    if k == 1:
      image = np.repeat(image[..., :1], 3, axis=2)
      Image.fromarray(image[..., 0], mode='L').save(path, quality=95, subsampling=0)
    else:
      Image.fromarray(image).save(path, quality=95, subsampling=0)
    lines.append(f'val_{k}.JPEG\t{w}\t0\t0\t63\t63')
    written['test'].append((path, ids[w], image))
  (base / 'val' / 'val_annotations.txt').write_text('\n'.join(lines) + '\n')
  return base, written


def _check_tiny(ds_images, ds_labels, written):
  from PIL import Image
  assert ds_images.shape == (len(written), 64, 64, 3) and ds_images.dtype == np.uint8
  for i, (path, label, image) in enumerate(written):
    with Image.open(path) as img:  # what a JPEG decoder makes of the file
      np.testing.assert_array_equal(ds_images[i], np.asarray(img.convert('RGB')))
    # ... and it is the image written, up to JPEG error (catches transposes/flips).
    assert np.abs(ds_images[i].astype(int) - image).mean() < 8
    assert ds_labels[i] == label


@pytest.fixture(scope='module')
def tiny_source(tmp_path_factory):
  root = tmp_path_factory.mktemp('tiny')
  base, written = _write_tiny(root)
  shutil.make_archive(str(root / 'zipped' / 'tiny-imagenet-200'), 'zip', root, 'tiny-imagenet-200')
  return root, base, written


def test_tiny_imagenet_direct_reader_folder_and_zip(tiny_source):
  root, base, written = tiny_source
  for path in (base, root / 'zipped' / 'tiny-imagenet-200.zip'):
    for split in ('train', 'test'):
      images, labels = read_source(path, split)
      _check_tiny(images, labels, written[split])
  ds = data.tiny_imagenet('test', data_dir=root, use_tfds=False)
  assert (ds.num_classes, ds.mean, ds.std, ds.name) == (
      200, data.TINY_IMAGENET_MEAN, data.TINY_IMAGENET_STD, 'tiny_imagenet')
  _check_tiny(ds.images, ds.labels, written['test'])


def test_tiny_imagenet_tfds_builder_prepares_without_tensorflow(tiny_source, tmp_path):
  root, _, written = tiny_source
  tfds_dir = tmp_path / 'tfds'
  for split in ('train', 'test'):  # the first call prepares from the zip
    ds = data.tiny_imagenet(split, data_dir=tfds_dir, manual_dir=root / 'zipped')
    _check_tiny(ds.images, ds.labels, written[split])
  assert (tfds_dir / 'tiny_imagenet' / '1.0.0').is_dir()
  # Prepared: no source needed any more.
  ds = data.load('tiny_imagenet', 'train', data_dir=tfds_dir)
  _check_tiny(ds.images, ds.labels, written['train'])
  assert data.TinyImagenet.name == 'tiny_imagenet'


def test_tiny_imagenet_missing(tmp_path):
  with pytest.raises(FileNotFoundError) as info:
    data.tiny_imagenet('train', data_dir=tmp_path, use_tfds=False)
  assert '\n' not in str(info.value) and 'tiny-imagenet-200.zip' in str(info.value)


def test_load_unknown_name_lists_valid_names():
  with pytest.raises(ValueError, match='fashion_mnist, cifar10, tiny_imagenet'):
    data.load('mnist', 'train')
  with pytest.raises(ValueError, match='split'):
    data.load('cifar10', 'validation')


# ------------------------------------------------------------------- pipeline

def _toy(n=10, hw=6, c=3, seed=0):
  """Labels = example ids, so batches show which examples they hold."""
  images = _rng(seed).integers(0, 256, (n, hw, hw, c), dtype=np.uint8)
  return data.Dataset(images, np.arange(n, dtype=np.int32), n, (0.5,) * c, (0.25,) * c, 'toy')


def test_normalize_values():
  x = np.array([[[[0, 255, 51]]]], np.uint8)
  out = data.normalize(x, data.CIFAR10_MEAN, data.CIFAR10_STD)
  expected = (x / 255.0 - np.array(data.CIFAR10_MEAN)) / np.array(data.CIFAR10_STD)
  assert out.dtype == np.float32 and out.shape == x.shape
  np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(data.normalize(np.uint8([255]), 0.5, 0.5), [1.0])


def test_augment_identity_flip_and_edge_crop():
  images = _rng().integers(0, 256, (64, 5, 7, 3), dtype=np.uint8)
  out = data.augment(_rng(1), images, pad=0, flip=False)
  np.testing.assert_array_equal(out, images)
  # Non-contiguous input takes the plain fancy-index path: same result.
  view = images[:, ::-1]
  np.testing.assert_array_equal(data.augment(_rng(4), view, 2, True),
                                data.augment(_rng(4), view.copy(), 2, True))

  flipped = data.augment(_rng(2), images, pad=0, flip=True)
  is_flip = [np.array_equal(f, x[:, ::-1]) for f, x in zip(flipped, images)]
  is_same = [np.array_equal(f, x) for f, x in zip(flipped, images)]
  assert all(a or b for a, b in zip(is_flip, is_same)) and any(is_flip) and any(is_same)

  # Reference: np.pad(mode='edge'), crop, flip — with the same random draws.
  pad = 2
  out = data.augment(_rng(3), images, pad=pad, flip=True)
  dy, dx, flips = pipeline._augment_params(_rng(3), 64, pad, True)
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode='edge')
  for i in range(64):
    ref = padded[i, dy[i]:dy[i] + 5, dx[i]:dx[i] + 7]
    np.testing.assert_array_equal(out[i], ref[:, ::-1] if flips[i] else ref)
  assert out.shape == images.shape and out.dtype == np.uint8
  assert len(set(zip(dy, dx))) > 5  # offsets really vary


def test_steps_per_epoch():
  assert data.steps_per_epoch(10, 4, True) == 2
  assert data.steps_per_epoch(10, 4, False) == 3
  assert data.steps_per_epoch(8, 4, False) == 2


def _collect(batches):
  return [{k: v.copy() for k, v in b.items()} for b in batches]


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys() == {'image', 'label', 'mask'}
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_epoch_batches_deterministic_and_resumable():
  ds = _toy(n=23)
  kw = dict(augment_pad=2, flip=True)
  full = _collect(data.epoch_batches(ds, 4, seed=3, epoch=1, **kw))
  assert len(full) == 5
  _assert_same(full, _collect(data.epoch_batches(ds, 4, seed=3, epoch=1, **kw)))
  for k in (1, 3, 5):
    _assert_same(full[k:], _collect(data.epoch_batches(ds, 4, seed=3, epoch=1, start_step=k, **kw)))
  other = _collect(data.epoch_batches(ds, 4, seed=3, epoch=2, **kw))
  assert not np.array_equal(full[0]['label'], other[0]['label'])
  labels = np.concatenate([b['label'] for b in full])
  assert len(set(labels.tolist())) == 20  # a permutation, remainder dropped
  b = full[0]
  assert b['image'].shape == (4, 6, 6, 3) and b['image'].dtype == np.float32
  assert b['label'].dtype == np.int32 and b['mask'].all()


def test_epoch_batches_without_augmentation_are_normalised_examples():
  ds = _toy(n=8)
  for b in data.epoch_batches(ds, 4, seed=0, epoch=0):
    expected = data.normalize(ds.images[b['label']], ds.mean, ds.std)
    np.testing.assert_array_equal(b['image'], expected)


@pytest.mark.parametrize('process_count', [2, 4])
def test_epoch_batches_process_slices_form_global_batch(process_count):
  ds = _toy(n=30)
  kw = dict(augment_pad=1, flip=True, drop_remainder=False)
  whole = _collect(data.epoch_batches(ds, 8, seed=5, epoch=0, **kw))
  parts = [_collect(data.epoch_batches(ds, 8, seed=5, epoch=0, process_index=p,
                                       process_count=process_count, **kw))
           for p in range(process_count)]
  for step, batch in enumerate(whole):
    for k in batch:
      np.testing.assert_array_equal(
          np.concatenate([part[step][k] for part in parts]), batch[k])
  assert parts[0][0]['image'].shape[0] == 8 // process_count
  with pytest.raises(ValueError, match='multiple'):
    next(data.epoch_batches(ds, 6, seed=0, epoch=0, process_count=4))


def test_epoch_batches_eval_padding_mask():
  ds = _toy(n=10)
  batches = _collect(data.epoch_batches(ds, 4, seed=0, epoch=0, shuffle=False,
                                        drop_remainder=False))
  assert len(batches) == 3
  assert all(b['image'].shape == (4, 6, 6, 3) for b in batches)
  np.testing.assert_array_equal(batches[-1]['mask'], [True, True, False, False])
  real = np.concatenate([b['label'][b['mask']] for b in batches])
  np.testing.assert_array_equal(real, np.arange(10))  # every example once, in order
  np.testing.assert_array_equal(batches[-1]['image'][:2],
                                data.normalize(ds.images[8:], ds.mean, ds.std))


def test_subset():
  ds = _toy(n=10)
  small = data.subset(ds, 3)
  assert small.num_examples == 3 and small.num_classes == 10
  np.testing.assert_array_equal(small.images, ds.images[:3])
  assert data.subset(ds, None) is ds and data.subset(ds, 99) is ds
  drawn = data.subset(ds, 4, seed=1)
  assert drawn.num_examples == 4 and np.all(np.diff(drawn.labels) > 0)
  np.testing.assert_array_equal(drawn.images, ds.images[drawn.labels])
  np.testing.assert_array_equal(drawn.labels, data.subset(ds, 4, seed=1).labels)


def test_holdout_is_a_fixed_disjoint_split_in_order():
  ds = _toy(n=10)  # labels 0..9 identify the examples
  rest, held = data.holdout(ds, 3)
  assert (rest.num_examples, held.num_examples) == (7, 3)
  # Together every example exactly once, each part in dataset order.
  np.testing.assert_array_equal(np.sort(np.concatenate([rest.labels, held.labels])), np.arange(10))
  assert np.all(np.diff(rest.labels) > 0) and np.all(np.diff(held.labels) > 0)
  np.testing.assert_array_equal(held.images, ds.images[held.labels])
  # The same draw every time (every run of a study shares it), another with another seed.
  np.testing.assert_array_equal(data.holdout(ds, 3)[1].labels, held.labels)
  assert any(not np.array_equal(data.holdout(ds, 3, seed=s)[1].labels, held.labels)
             for s in range(1, 6))
  for bad in (0, 10, -1):
    with pytest.raises(ValueError, match='hold out'):
      data.holdout(ds, bad)


def test_prefetch_order_errors_and_close():
  assert list(data.prefetch(iter(range(7)), size=2)) == list(range(7))

  def failing():
    yield 1
    raise RuntimeError('boom')
  it = data.prefetch(failing())
  assert next(it) == 1
  with pytest.raises(RuntimeError, match='boom'):
    next(it)

  produced = []
  def endless():
    i = 0
    while True:
      produced.append(i)
      yield i
      i += 1
  with data.prefetch(endless(), size=2) as it:
    assert next(it) == 0
  assert not any(t.name == 'cerdeq-prefetch' and t.is_alive() for t in threading.enumerate())
  assert len(produced) <= 5  # bounded read-ahead
