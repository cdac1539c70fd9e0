"""CIFAR-10 (the paper's recipe): ``python -m experiments.cifar10 --eps=8/255``.

CerDEQ, 200 epochs, ε ramp from epoch 1 over 80 epochs, lr x0.2 at 120 and
140, Adam 5e-4, batch 128, crop (pad 2) + flip; needs the data prepared
offline (see README) and, for these budgets, an accelerator.
"""
from experiments.common import Config, main_with_defaults

DEFAULTS = Config(dataset='cifar10', model='cerdeq', eps=8 / 255, epochs=200,
                  milestones=(120, 140), eps_start_epochs=1, eps_length_epochs=80,
                  augment_pad=2, reg_lambda=0.5)

if __name__ == '__main__':
  main_with_defaults(DEFAULTS)
