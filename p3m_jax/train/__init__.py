"""Training: mesh and shardings, state, optimizer, pure step functions (and the loop)."""

from p3m_jax.train.mesh import batch_sharding, initialize_distributed_if_needed, make_mesh, replicated
from p3m_jax.train.optimizer import OptimizerOptions, make_optimizer
from p3m_jax.train.state import TrainState, create_sharded_train_state, create_train_state, state_shardings
from p3m_jax.train.step import eval_step, make_train_step, prepare_batch, train_step

__all__ = [
    "OptimizerOptions",
    "TrainState",
    "batch_sharding",
    "create_sharded_train_state",
    "create_train_state",
    "eval_step",
    "initialize_distributed_if_needed",
    "make_mesh",
    "make_optimizer",
    "make_train_step",
    "prepare_batch",
    "replicated",
    "state_shardings",
    "train_step",
]
