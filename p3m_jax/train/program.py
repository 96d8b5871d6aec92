"""The training program of a config on a mesh: the model, the optimizer, the state's shardings and the
compiled train step, built the same way for a run (`loop`) and for a plan made ahead of time for
another machine (`tpu_plan`, which compiles for a Cloud TPU slice from abstract inputs)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from p3m_jax.data.transforms import element_spec
from p3m_jax.models import build_model, remat_policy
from p3m_jax.train import mesh as mesh_lib
from p3m_jax.train import state as state_lib
from p3m_jax.train import step as step_lib
from p3m_jax.train.config_checks import DTYPES, model_options
from p3m_jax.train.memory_plan import Setting
from p3m_jax.train.optimizer import OptimizerOptions, make_optimizer
from p3m_jax.weights.initialize import init_key


@dataclasses.dataclass
class TrainProgram:
    """What a run of ``config`` on ``mesh`` compiles; `build` makes it from the config alone."""

    config: Any
    mesh: Any
    model: Any
    optimizer: Any
    lr_schedule: Any
    ema_decay: float
    fcp: Any
    shardings: Any
    abstract_state: Any  # ShapeDtypeStructs carrying ``shardings``

    @classmethod
    def build(cls, config, mesh) -> "TrainProgram":
        model = _build_model(config, remat_policy(config.remat))
        optimizer, lr_schedule = make_optimizer(OptimizerOptions.from_config(config.optimizer), config.num_train_steps)
        ema_decay = step_lib.StepOptions.from_config(config).ema_decay
        program = cls(
            config,
            mesh,
            model,
            optimizer,
            lr_schedule,
            ema_decay,
            step_lib.FCPOptions.from_config(config.copy_paste.fcp),
            None,
            None,
        )
        abstract = jax.eval_shape(program.fresh_state)
        program.shardings = state_lib.state_shardings(abstract, mesh, config.param_sharding)
        program.abstract_state = jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, program.shardings
        )
        return program

    def fresh_state(self, variables=None):
        """A new train state (random variables unless ``variables`` are given)."""
        size = (self.config.data.image_size, self.config.data.image_size)
        return state_lib.create_train_state(
            self.model, self.optimizer, init_key(self.config.seed), size, variables=variables, ema=self.ema_decay > 0
        )

    def abstract_batch(self) -> dict:
        """The global training batch as ShapeDtypeStructs sharded over the mesh (the input pipeline's
        contract, P3M-CP's inputs included when the config turns them on)."""
        copy_paste = self.config.copy_paste
        spec = element_spec(
            self.config.data.image_size, icp=bool(copy_paste.icp.enabled), fcp=bool(copy_paste.fcp.enabled)
        )
        sharding = mesh_lib.batch_sharding(self.mesh)
        return {
            key: jax.ShapeDtypeStruct((self.config.batch_size, *shape), np.dtype(dtype), sharding=sharding)
            for key, (shape, dtype) in spec.items()
        }

    def compile(self, setting: Setting, state=None, batch=None):
        """The train step compiled for ``setting`` on abstract (default) or real ``state`` and ``batch``."""
        model = (
            self.model if setting.remat == remat_policy(self.config.remat) else _build_model(self.config, setting.remat)
        )
        fn = step_lib.make_train_step(
            model,
            self.optimizer,
            self.mesh,
            self.shardings,
            lr_schedule=self.lr_schedule,
            fcp=self.fcp,
            grad_accum_steps=setting.grad_accum_steps,
            ema_decay=self.ema_decay,
        )
        state = self.abstract_state if state is None else state
        return fn.lower(state, self.abstract_batch() if batch is None else batch).compile()


def _build_model(config, remat):
    return build_model(config.arch, dtype=DTYPES[config.dtype], remat=remat, **model_options(config))


__all__ = ["TrainProgram"]
