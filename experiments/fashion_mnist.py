"""Certified training on the real Fashion-MNIST, offline, on any machine.

    python -m experiments.fashion_mnist --eps=0.1 --workdir=runs/fmnist

Defaults are sized for a 2-core CPU (the README's main job): a 16-channel
CerDEQ at 14x14 (the injection downsamples), a 32-channel tail, 20 epochs.
"""
from experiments.common import Config, main_with_defaults

DEFAULTS = Config(
    dataset='fashion_mnist', model='cerdeq', eps=0.1, epochs=20, batch_size=128,
    milestones=(15, 18), eps_start_epochs=1, eps_length_epochs=8, augment_pad=1, flip=True,
    width=16, dense=128, tol=1e-3, max_iter=30, eval_examples_per_epoch=1000)

if __name__ == '__main__':
  main_with_defaults(DEFAULTS)
