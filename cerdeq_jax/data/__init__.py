"""Datasets and the numpy host input pipeline.

    ds = data.load('cifar10', 'train', data_dir=...)
    for batch in data.prefetch(data.epoch_batches(ds, 128, seed, epoch,
                                                  augment_pad=2, flip=True)):
      ...  # batch['image'] float32 NHWC normalised, 'label' int32, 'mask' bool

Note on names: ``cerdeq_jax.data.tiny_imagenet`` (the package attribute) is
the *loader function*; the module with the tfds builder is imported with
``from cerdeq_jax.data.tiny_imagenet import TinyImagenet`` (also available as
``cerdeq_jax.data.TinyImagenet``). tensorflow_datasets is imported only when
a tfds path is used.
"""
# Load the submodule first: importing it binds the package attribute
# `tiny_imagenet` to the module, which the loader function below replaces.
from cerdeq_jax.data import tiny_imagenet as _tiny_imagenet_module  # noqa: F401
from cerdeq_jax.data.idx import parse_idx, read_idx
from cerdeq_jax.data.datasets import (
    CIFAR10_MEAN, CIFAR10_STD, DATA_DIR_ENV, FASHION_MNIST_MEAN,
    FASHION_MNIST_STD, LOADERS, TINY_IMAGENET_MEAN, TINY_IMAGENET_STD,
    Dataset, cifar10, fashion_mnist, load, tiny_imagenet)
from cerdeq_jax.data.pipeline import (
    Prefetcher, augment, epoch_batches, epoch_permutation, normalize,
    holdout, prefetch, steps_per_epoch, subset)

__all__ = [
    'CIFAR10_MEAN', 'CIFAR10_STD', 'DATA_DIR_ENV', 'FASHION_MNIST_MEAN',
    'FASHION_MNIST_STD', 'LOADERS', 'TINY_IMAGENET_MEAN', 'TINY_IMAGENET_STD',
    'Dataset', 'Prefetcher', 'TinyImagenet', 'augment', 'cifar10',
    'epoch_batches', 'epoch_permutation', 'fashion_mnist', 'holdout', 'load', 'normalize',
    'parse_idx', 'prefetch', 'read_idx', 'steps_per_epoch', 'subset',
    'tiny_imagenet',
]


def __getattr__(name: str):
  # The tfds builder class is created on first use (imports tfds).
  if name == 'TinyImagenet':
    return getattr(_tiny_imagenet_module, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
