"""Tiny-ImageNet (64x64, 200 classes): ``python -m experiments.tiny_imagenet --eps=1/255``.

The published Fast-IBP Tiny-ImageNet run (its README): 80 epochs, ε ramp from
epoch 1 over 20 epochs (``start=2,length=20``), lr x0.2 at 61 and 71, λ = 0.2,
batch 128, crop (pad 4) + flip.

``--model=linf_dist_mlp``: the published ℓ∞-dist Net+MLP Tiny-ImageNet command
(command/ell_inf_dist_net++_tinyimagenet.sh): 500 epochs, batch 512, 5 layers of
5120, a 512-unit head, p 8 -> 1000 over epochs 100-450, lr 0.04 (cosine from
100), weight decay 5e-3, cross entropy with κ 1, radius 0.005 ramped over 200
epochs (for ε = 1/255; scale --linf_eps_train with ε). ``--model=linf_dist``
*(ours: no published Tiny-ImageNet command)*: the same with 6 layers and the
CIFAR-10 pure net's hinge (mix 0.75) at 5x ε.
"""
from experiments.common import Config, main_with_defaults

DEFAULTS = Config(dataset='tiny_imagenet', model='cerdeq', eps=1 / 255, epochs=80,
                  milestones=(61, 71), eps_start_epochs=1, eps_length_epochs=20,
                  augment_pad=4, reg_lambda=0.2)

_LINF = dict(epochs=500, batch_size=512, width=5120, lr=0.04, weight_decay=5e-3, p_start=8.0,
             p_end=1000.0, p_epochs=(100.0, 450.0), eps_start_epochs=0, augment_pad=4, flip=True)
MODEL_DEFAULTS = {
    'linf_dist': dict(_LINF, depth=6, linf_eps_train=5 / 255, eps_length_epochs=0,
                      linf_loss='hinge', hinge_mix=0.75, linf_kappa=1.0),
    'linf_dist_mlp': dict(_LINF, depth=5, dense=512, linf_eps_train=0.005, eps_length_epochs=200,
                          linf_loss='cross_entropy', linf_kappa=1.0),
}

if __name__ == '__main__':
  main_with_defaults(DEFAULTS, MODEL_DEFAULTS)
