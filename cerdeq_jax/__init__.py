"""cerdeq_jax: certifiably robust Deep Equilibrium Models in JAX/Flax."""
from cerdeq_jax.interval import Interval, linf_ball
from cerdeq_jax.solvers import Anderson, Picard, SolverStats, solve
from cerdeq_jax.implicit import fixed_point
from cerdeq_jax.deq import DEQStats, abs_operator_bound, solve_deq
