"""cerdeq_jax: certifiably robust Deep Equilibrium Models in JAX/Flax.

Public API (re-exported here); submodules: `ibp`, `crown` (with `graph`), `solvers`,
`implicit` (with `per_device`), `deq`, `parametrize` (with `orthogonal`, `reparam`,
`initializers`), `layers`, `linf_dist` (with `linf_training`), `models`, `losses`,
`schedules`, `attacks`, `recipe`, `training` (with `host_memory`), `checkpointing`, `data`.
"""
from cerdeq_jax import attacks, crown, deq, graph, host_memory, ibp, implicit, layers, losses
from cerdeq_jax import models, ops
from cerdeq_jax import initializers, orthogonal, parametrize, per_device, recipe, reparam
from cerdeq_jax import schedules, solvers
from cerdeq_jax import linf_dist, linf_training
from cerdeq_jax.attacks import pgd
from cerdeq_jax.deq import DEQStats, abs_operator_bound, solve_deq
from cerdeq_jax.implicit import fixed_point
from cerdeq_jax.interval import Interval, checked, linf_ball
from cerdeq_jax.parametrize import Parametrization
from cerdeq_jax.solvers import Anderson, Picard, SolverStats, solve

__version__ = '0.1.0'
