"""Certified training on the real Fashion-MNIST, offline, on any machine.

    python -m experiments.fashion_mnist --eps=0.1 --workdir=runs/fmnist

Defaults (the README's main job) are exactly the CerDEQ run of the study's
'main' plan, seed 0: 17 minutes of training on the idle 2-core development VM
(steps = 17 min / the calibrated step time in docs/results/calibration.json,
i.e. 6.975 passes over all 60,000 training images), ε = 0 with the Fast-IBP
warm-up regularisers for the first 10 %, the ε ramp over the next 50 %, lr x0.2
at 75 % and 90 %; a 16-channel CerDEQ at 14x14 (the injection downsamples), a
32-channel tail, dense 128; evaluated on the whole test set. No augmentation,
as in the published Fast-IBP MNIST recipe (its datasets.py: ToTensor only).
"""
from experiments.common import Config, main_with_defaults

DEFAULTS = Config(
    dataset='fashion_mnist', model='cerdeq', eps=0.1, epochs=6.975, batch_size=128,
    train_examples=None, milestones=(5.231, 6.277), eps_start_epochs=0.698,
    eps_length_epochs=3.487, augment_pad=0, flip=False, deq_stride=2, width=16, dense=128, tol=1e-3, max_iter=30,
    eval_examples_per_epoch=500)

if __name__ == '__main__':
  main_with_defaults(DEFAULTS)
