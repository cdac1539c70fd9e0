"""Tiny-ImageNet (64x64, 200 classes): ``python -m experiments.tiny_imagenet --eps=1/255``."""
from experiments.common import Config, main_with_defaults

DEFAULTS = Config(dataset='tiny_imagenet', model='cerdeq', eps=1 / 255, epochs=160,
                  milestones=(120, 140), eps_start_epochs=1, eps_length_epochs=80,
                  augment_pad=4, reg_lambda=0.2)

if __name__ == '__main__':
  main_with_defaults(DEFAULTS)
