"""CIFAR-10 (the paper's recipe): ``python -m experiments.cifar10 --eps=8/255``.

CerDEQ, 200 epochs, ε ramp from epoch 1 over 80 epochs, lr x0.2 at 120 and
140, Adam 5e-4, batch 128, crop (pad 2) + flip; needs the data prepared
offline (see README) and, for these budgets, an accelerator.

``--model=linf_dist`` / ``linf_dist_mlp``: the published ℓ∞-dist Net CIFAR-10
commands (command/ell_inf_dist_net*_cifar10.sh): 800 epochs, batch 512, 5120
neurons, p 8 -> 1000 over epochs 100-750, lr 0.02 (cosine from 100), weight
decay 5e-3; pure: 6 layers, hinge mix 0.75, radius 0.1568; +MLP: 5 layers, a
512-unit head, cross entropy with κ 0.95, radius 0.03451 ramped over 100 epochs.
Published augmentation: crop with 4 pixels of zero padding + flip (here edge
padding).
"""
from experiments.common import Config, main_with_defaults

DEFAULTS = Config(dataset='cifar10', model='cerdeq', eps=8 / 255, epochs=200,
                  milestones=(120, 140), eps_start_epochs=1, eps_length_epochs=80,
                  augment_pad=2, reg_lambda=0.5)

_LINF = dict(epochs=800, batch_size=512, width=5120, lr=0.02, weight_decay=5e-3, p_start=8.0,
             p_end=1000.0, p_epochs=(100.0, 750.0), eps_start_epochs=0, augment_pad=4, flip=True)
MODEL_DEFAULTS = {
    'linf_dist': dict(_LINF, depth=6, linf_eps_train=0.1568, eps_length_epochs=0,
                      linf_loss='hinge', hinge_mix=0.75, linf_kappa=1.0),
    'linf_dist_mlp': dict(_LINF, depth=5, dense=512, linf_eps_train=0.03451,
                          eps_length_epochs=100, linf_loss='cross_entropy', linf_kappa=0.95),
}

if __name__ == '__main__':
  main_with_defaults(DEFAULTS, MODEL_DEFAULTS)
