"""Certified training on the real Fashion-MNIST, offline, on any machine.

    python -m experiments.fashion_mnist --eps=0.1 --workdir=runs/fmnist

Defaults are sized for about 20 minutes of a 2-core CPU (the README's main
job): a 16-channel CerDEQ at 14x14 (the injection downsamples), a 32-channel
tail, 8 epochs on the first 20,000 training images (1 warm-up epoch at ε = 0,
a 5-epoch ε ramp, 2 at ε), evaluated on the whole test set. No augmentation, as
in the published Fast-IBP MNIST recipe (its datasets.py: ToTensor only).
"""
from experiments.common import Config, main_with_defaults

DEFAULTS = Config(
    dataset='fashion_mnist', model='cerdeq', eps=0.1, epochs=8, batch_size=128,
    train_examples=20000, milestones=(7,), eps_start_epochs=1, eps_length_epochs=5,
    augment_pad=0, flip=False, deq_stride=2, width=16, dense=128, tol=1e-3, max_iter=30,
    eval_examples_per_epoch=500)

if __name__ == '__main__':
  main_with_defaults(DEFAULTS)
