"""The optimizer and its learning-rate schedule, from `config.optimizer` (see the recipes in
`p3m_jax/configs/` for the fields and their values; the paper's is Adam at a constant 1e-5)."""

from __future__ import annotations

import dataclasses

import optax

from p3m_jax.common.errors import check

OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("constant", "warmup_cosine")


@dataclasses.dataclass(frozen=True)
class OptimizerOptions:
    """The fields of ``config.optimizer``, checked once when built.

    ``weight_decay`` is decoupled for adamw and added to the gradient for adam (as PyTorch's
    ``Adam(weight_decay=...)``); ``grad_clip_norm`` > 0 clips the global gradient norm."""

    name: str
    learning_rate: float
    schedule: str
    warmup_steps: int
    end_learning_rate_factor: float
    weight_decay: float
    grad_clip_norm: float
    b1: float
    b2: float

    def __post_init__(self):
        check(self.name in OPTIMIZERS, "optimizer.name", f"{self.name!r} is not one of {OPTIMIZERS}")
        check(self.schedule in SCHEDULES, "optimizer.schedule", f"{self.schedule!r} is not one of {SCHEDULES}")
        for field in ("learning_rate", "warmup_steps", "end_learning_rate_factor", "weight_decay", "grad_clip_norm"):
            value = getattr(self, field)
            check(value >= 0, f"optimizer.{field}", f"must be >= 0, got {value}")
        for field in ("b1", "b2"):
            value = getattr(self, field)
            check(0.0 <= value < 1.0, f"optimizer.{field}", f"must be in [0, 1), got {value}")

    @classmethod
    def from_config(cls, optimizer_config) -> "OptimizerOptions":
        """From ``config.optimizer`` (a ConfigDict or a dict holding every field)."""
        get = lambda name: optimizer_config[name]  # noqa: E731
        return cls(
            name=str(get("name")),
            learning_rate=float(get("learning_rate")),
            schedule=str(get("schedule")),
            warmup_steps=int(get("warmup_steps")),
            end_learning_rate_factor=float(get("end_learning_rate_factor")),
            weight_decay=float(get("weight_decay")),
            grad_clip_norm=float(get("grad_clip_norm")),
            b1=float(get("b1")),
            b2=float(get("b2")),
        )


def make_learning_rate_schedule(options: OptimizerOptions, num_train_steps: int) -> optax.Schedule:
    """``constant``, or ``warmup_cosine``: linear warmup from 0 over ``warmup_steps``, then cosine
    decay to ``end_learning_rate_factor * learning_rate`` at ``num_train_steps``."""
    lr = options.learning_rate
    if options.schedule == "constant":
        return optax.constant_schedule(lr)
    decay_steps = max(int(num_train_steps), options.warmup_steps + 1)
    end = lr * options.end_learning_rate_factor
    return optax.warmup_cosine_decay_schedule(0.0, lr, options.warmup_steps, decay_steps, end)


def make_optimizer(
    options: OptimizerOptions, num_train_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``(optimizer, lr_schedule)``; ``lr_schedule(step)`` is the learning rate of the update at
    ``step`` (for logging)."""
    if not isinstance(options, OptimizerOptions):
        raise TypeError(f"make_optimizer takes OptimizerOptions.from_config(config.optimizer), got {type(options)}")
    schedule = make_learning_rate_schedule(options, num_train_steps)
    parts = []
    if options.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(options.grad_clip_norm))
    if options.name == "adam":
        if options.weight_decay > 0:
            parts.append(optax.add_decayed_weights(options.weight_decay))
        parts.append(optax.adam(schedule, b1=options.b1, b2=options.b2))
    else:
        parts.append(optax.adamw(schedule, b1=options.b1, b2=options.b2, weight_decay=options.weight_decay))
    return (parts[0] if len(parts) == 1 else optax.chain(*parts)), schedule


__all__ = ["OPTIMIZERS", "SCHEDULES", "OptimizerOptions", "make_learning_rate_schedule", "make_optimizer"]
