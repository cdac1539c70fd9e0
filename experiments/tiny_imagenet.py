"""Tiny-ImageNet (64x64, 200 classes): ``python -m experiments.tiny_imagenet --eps=1/255``.

The published Fast-IBP Tiny-ImageNet run (its README): 80 epochs, ε ramp from
epoch 1 over 20 epochs (``start=2,length=20``), lr x0.2 at 61 and 71, λ = 0.2,
batch 128, crop (pad 4) + flip.
"""
from experiments.common import Config, main_with_defaults

DEFAULTS = Config(dataset='tiny_imagenet', model='cerdeq', eps=1 / 255, epochs=80,
                  milestones=(61, 71), eps_start_epochs=1, eps_length_epochs=20,
                  augment_pad=4, reg_lambda=0.2)

if __name__ == '__main__':
  main_with_defaults(DEFAULTS)
