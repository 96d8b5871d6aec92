"""Shared pieces of the training-step tests (imported by the tests and by their subprocesses).

`TinyP3M` is a cheap stand-in for P3M-Net with the same output contract, built from the real
layers (conv2d, the PyTorch-semantics BatchNorm, max-pool indices and unpooling, DropPath), so
the sharding/multi-process tests of the step machinery compile in seconds instead of minutes.
The real variants are exercised by the overfitting and remat tests.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from p3m_jax.models.attention import DropPath
from p3m_jax.models.fcp import apply_fcp
from p3m_jax.models import REMAT_POLICIES, P3MNet
from p3m_jax.models.decoder import DecoderSpec, EncoderOutput
from p3m_jax.models.layers import BatchNorm, conv2d
from p3m_jax.ops.pooling import max_pool_with_argmax, max_unpool_2x2
from p3m_jax.ops.resize import upsample_bilinear


class TinyEncoder(nn.Module):
    """The stand-in's encoder: a full-resolution conv/BN feature and a half-resolution one."""

    dtype: jnp.dtype
    drop_path: float
    width: int
    batch_norm: bool = True

    @nn.compact
    def __call__(self, x, train: bool = False) -> EncoderOutput:
        x = x.astype(self.dtype)
        norm = lambda name, y: BatchNorm(dtype=self.dtype, name=name)(y, train) if self.batch_norm else y
        h = nn.relu(norm("bn0", conv2d(self.width, 3, use_bias=False, name="conv0", dtype=self.dtype)(x)))
        p, idx = max_pool_with_argmax(h, 2, 2, 0)
        g = nn.relu(norm("bn1", conv2d(self.width, 3, use_bias=False, name="conv1", dtype=self.dtype)(p)))
        g = p + DropPath(self.drop_path, name="drop")(g, train)
        return EncoderOutput(deep=g, features=(h,), indices=(idx,))


class TinyP3M(nn.Module):
    """Six P3M-Net outputs from a two-level conv/BN network (NHWC, sides multiples of 2). Takes
    P3M-CP's ``fcp`` inputs like P3MNet, for the FCP layers ``e0`` (full resolution) and ``deep``."""

    dtype: jnp.dtype = jnp.float32
    drop_path: float = 0.3
    width: int = 8  # channels of the hidden layers (wider: larger checkpoints, same program shape)
    batch_norm: bool = True  # False: no BatchNorm, so samples do not interact (gradient accumulation tests)

    @nn.compact
    def __call__(self, x, train: bool = False, fcp=None):
        encoder = TinyEncoder(self.dtype, self.drop_path, self.width, self.batch_norm, name="encoder")
        features = encoder(x, train)
        if fcp is not None:
            features = apply_fcp(self, encoder, features, fcp, train)
        h, g, idx = features.features[0], features.deep, features.indices[0]
        up = upsample_bilinear(g, 2)
        glob = conv2d(3, 3, use_bias=True, name="global", dtype=self.dtype)(up)
        sides = [conv2d(3, 1, use_bias=True, name=f"side{i}", dtype=self.dtype)(up) for i in range(3)]
        loc = conv2d(self.width, 3, use_bias=True, name="local0", dtype=self.dtype)(max_unpool_2x2(g, idx) + h)
        local = nn.sigmoid(
            conv2d(1, 3, use_bias=True, name="local1", dtype=self.dtype)(nn.relu(loc)).astype(jnp.float32)
        )
        glob = glob.astype(jnp.float32)
        cls = jnp.argmax(glob, axis=-1)[..., None]
        fusion = local * (cls == 1) + (cls == 2).astype(jnp.float32)
        return {
            "global": glob,
            "local": local,
            "fusion": fusion,
            "side2": sides[0].astype(jnp.float32),
            "side1": sides[1].astype(jnp.float32),
            "side0": sides[2].astype(jnp.float32),
        }


def make_batch(batch_size: int, size: int, seed: int = 0, has_fg_bg=None) -> dict:
    """A uint8 host-contract batch with a plausible alpha/trimap (a soft disc per sample)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    alphas, trimaps = [], []
    for _ in range(batch_size):
        cy, cx = rng.uniform(0.3, 0.7, 2) * size
        r = rng.uniform(0.2, 0.35) * size
        d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        a = np.clip((r - d) / (0.1 * size) + 0.5, 0, 1)
        alphas.append(np.round(a * 255).astype(np.uint8))
        t = np.full((size, size), 128, np.uint8)
        t[a == 0] = 0
        t[a == 1] = 255
        trimaps.append(t)
    alpha = np.stack(alphas)[..., None]
    fg = rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)
    bg = rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)
    a3 = alpha.astype(np.float32) / 255
    image = np.round(a3 * fg + (1 - a3) * bg).astype(np.uint8)
    if has_fg_bg is None:
        has_fg_bg = np.ones(batch_size, bool)
    return {
        "image": image,
        "alpha": alpha,
        "trimap": np.stack(trimaps)[..., None],
        "fg": fg,
        "bg": bg,
        "has_fg_bg": np.asarray(has_fg_bg, bool),
        "facemask": np.zeros((batch_size, size, size, 1), np.uint8),
        "has_facemask": np.zeros(batch_size, bool),
    }


def to_numpy(tree):
    return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), tree)


def flat(tree) -> dict:
    """{'/'-joined path: numpy array} of a pytree (for saving and comparing)."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {jax.tree_util.keystr(p): np.asarray(jax.device_get(v)) for p, v in leaves}


def run_tiny_training(
    mesh,
    batch: dict,
    steps: int,
    param_sharding: str = "replicated",
    dtype=jnp.float32,
    lr: float = 0.05,
    seed: int = 0,
    grad_accum_steps: int = 1,
    ema_decay: float = 0.0,
    fcp=None,
    **model_options,
):
    """Trains TinyP3M with SGD (differences in gradients show up linearly in the parameters)
    for ``steps`` steps on the same global ``batch``. Returns (state, list of metrics)."""
    import optax
    from p3m_jax.train import create_sharded_train_state, make_train_step
    from p3m_jax.train.mesh import batch_sharding

    model = TinyP3M(dtype=dtype, **model_options)
    tx = optax.sgd(lr)
    state, shardings = create_sharded_train_state(
        model, tx, jax.random.key(seed), 32, mesh, param_sharding, ema=ema_decay > 0
    )
    step = make_train_step(
        model,
        tx,
        mesh,
        shardings,
        lr_schedule=optax.constant_schedule(lr),
        fcp=fcp,
        grad_accum_steps=grad_accum_steps,
        ema_decay=ema_decay,
    )
    sharding = batch_sharding(mesh)
    if jax.process_count() > 1:
        # Every process holds the full batch here; it feeds its own contiguous slice.
        n = batch["image"].shape[0] // jax.process_count()
        lo = jax.process_index() * n
        device_batch = {k: jax.make_array_from_process_local_data(sharding, v[lo : lo + n]) for k, v in batch.items()}
    else:
        device_batch = jax.device_put(batch, sharding)
    metrics = []
    for _ in range(steps):
        state, m = step(state, device_batch)
        metrics.append(m)
    return state, [to_numpy(m) for m in metrics]


def use_tiny_model(patch=None, width: int = 8) -> None:
    """Makes the training loop, the predictor and initialisation build `TinyP3M` for every arch, for tests
    of the loop rather than the architecture (the real networks compile in minutes on a 2-core CPU).
    ``patch``: a pytest MonkeyPatch (undone after the test); without it the change is for this process."""
    from p3m_jax.inference import predictor
    from p3m_jax.train import program
    from p3m_jax.weights import initialize

    def build_tiny(arch, dtype=jnp.float32, remat="none", **options):
        return TinyP3M(dtype=dtype, width=width)

    for module in (program, predictor, initialize):
        if patch is not None:
            patch.setattr(module, "build_model", build_tiny)
        else:
            setattr(module, "build_model", build_tiny)
    # The jitted initializers are cached by arch and options, not by the builder: a real network's,
    # compiled by an earlier test of this process, would hand out its variables for the stand-in.
    if patch is not None:
        patch.setattr(initialize, "_INITIALIZERS", {})
    else:
        initialize._INITIALIZERS = {}


class _SmallStage(nn.Module):
    """conv3x3 + BatchNorm + ReLU."""

    width: int

    @nn.compact
    def __call__(self, x, train: bool):
        x = conv2d(self.width, 3, use_bias=False, name="conv")(x)
        return nn.relu(BatchNorm(name="bn")(x, train))


class SmallEncoder(nn.Module):
    """A five-level conv/BN encoder with the `EncoderOutput` contract of the real ones, narrow enough to
    compile in seconds; with ``remat`` each level is rematerialised like the real encoders' stages."""

    widths: tuple = (8, 8, 8, 16, 16, 32)  # features 0-4 (pooled with indices), then the deep feature
    remat: bool = False

    @nn.compact
    def __call__(self, x, train: bool) -> EncoderOutput:
        stage_cls = nn.remat(_SmallStage, static_argnums=(2,)) if self.remat else _SmallStage
        feats, indices = [], []
        for level, width in enumerate(self.widths[:5]):
            x = stage_cls(width, name=f"stage{level}")(x, train)
            feats.append(x)
            x, idx = max_pool_with_argmax(x, 2, 2, 0)
            indices.append(idx)
        deep = stage_cls(self.widths[5], name="deep")(x, train)
        return EncoderOutput(deep=deep, features=tuple(feats), indices=tuple(indices))


# The real decoder at the small encoder's widths: (deep, decoder levels 3..0, last block).
SMALL_DECODER = DecoderSpec((32, 16, 16, 8, 8, 8), "first", True, 2)


def small_p3mnet(remat: str = "none") -> P3MNet:
    """P3M-Net with the real decoder and bridges on `SmallEncoder`, rematerialised like `build_model`."""
    encoder_remat, decoder_remat = REMAT_POLICIES[remat]
    return P3MNet(
        encoder=SmallEncoder(remat=encoder_remat, name="encoder"),
        decoder_spec=SMALL_DECODER,
        decoder_remat=decoder_remat,
    )
