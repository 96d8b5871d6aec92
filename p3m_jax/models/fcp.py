"""P3M-CP feature-level copy and paste (FCP) on encoder features.

Where a training example's (resized) face region lies, the encoder features of chosen layers
are replaced by the same network's features of the aligned source face (the example's image
with a normal face pasted on its face, see `p3m_jax.data.cp_transforms.aligned_source`). The source
path carries no gradient (``jax.lax.stop_gradient``), as the paper's "detach".

Layer names (`FCP_LAYERS`): ``e0`` .. ``e4`` are ``EncoderOutput.features[0..4]`` (resolutions
1, 1/2, 1/4, 1/8, 1/16 of the input; for the ResNet-34 variant ``e0`` is the stem, ``e1`` the
first pooled map (e0p in docs/design.md) and ``e2``..``e4`` layer1..layer3; for Swin-T/ViTAE-S they
are f0..f4), and ``deep`` is ``EncoderOutput.deep`` (1/32). Pooling indices are never replaced:
the local branch unpools with the target's indices.

The replacement happens at the encoder/decoder interface: the features the decoder receives
(skips, and the deep feature for ``deep``) are replaced, the encoder's own deeper stages still
see the target's features. This keeps every encoder unchanged (one hook for the three
variants).

Mask at a layer's resolution: the input-resolution mask (float in [0, 1]) is area-averaged
over each feature position's 2^k x 2^k footprint and a position is replaced when more than half
of its footprint is masked (``> 0.5``), so a replaced position's receptive-field centre lies
mostly on the pasted face; small faces may vanish at the coarsest layers.

BatchNorm in the source pass: in training the source runs in training mode (normalised with
its own batch statistics, like the target, so pasted and surrounding features live in the same
range) but its running-statistics updates are discarded: the source pass is a functional
``apply`` of the encoder's current variables whose mutated ``batch_stats`` are thrown away.
The running statistics therefore see only the real training images, exactly as without FCP.
In evaluation mode both passes use the running statistics.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

from p3m_jax.models.decoder import EncoderOutput
from p3m_jax.ops.normalize import normalize_uint8

# Layer name -> index into EncoderOutput.features (None: EncoderOutput.deep).
FCP_LAYERS: dict[str, int | None] = {"e0": 0, "e1": 1, "e2": 2, "e3": 3, "e4": 4, "deep": None}
DEFAULT_FCP_LAYERS = ("e3",)


def check_layers(layers: Sequence[str]) -> tuple[str, ...]:
    """Validates FCP layer names; returns them as a tuple."""
    layers = tuple(layers)
    unknown = [name for name in layers if name not in FCP_LAYERS]
    if unknown or not layers:
        raise ValueError(f"FCP layers must be a non-empty subset of {sorted(FCP_LAYERS)}; got {list(layers)}")
    return layers


def mask_at(mask: jax.Array, height: int, width: int) -> jax.Array:
    """(N, H, W, 1) float mask in [0, 1] -> (N, height, width, 1) bool, True where more than
    half of a position's footprint is masked. H and W must be multiples of height and width."""
    n, h, w, _ = mask.shape
    if h % height or w % width:
        raise ValueError(f"FCP mask {h}x{w} is not a multiple of the feature map {height}x{width}")
    fy, fx = h // height, w // width
    area = mask.astype(jnp.float32).reshape(n, height, fy, width, fx, 1).mean(axis=(2, 4))
    return area > 0.5


def replace_features(
    target: EncoderOutput,
    source: EncoderOutput,
    mask: jax.Array,
    apply: jax.Array,
    layers: Sequence[str] = DEFAULT_FCP_LAYERS,
) -> EncoderOutput:
    """FCP: ``target`` with the chosen layers' masked positions taken from ``source``.

    Args:
      target, source: encoder outputs of the same shapes.
      mask: (N, H, W, 1) float in [0, 1] at the input resolution.
      apply: (N,) bool; examples where it is false keep all their target features.
      layers: names from `FCP_LAYERS`.

    Returns:
      An `EncoderOutput` whose replaced values are ``stop_gradient(source)``; the indices are
      the target's.
    """
    layers = check_layers(layers)
    apply = apply.astype(bool).reshape((-1, 1, 1, 1))

    def swap(t, s):
        m = mask_at(mask, t.shape[1], t.shape[2]) & apply
        return jnp.where(m, jax.lax.stop_gradient(s).astype(t.dtype), t)

    features = list(target.features)
    deep = target.deep
    for name in layers:
        k = FCP_LAYERS[name]
        if k is None:
            deep = swap(target.deep, source.deep)
        else:
            features[k] = swap(target.features[k], source.features[k])
    return EncoderOutput(deep=deep, features=tuple(features), indices=target.indices)


def encode_source(
    parent: nn.Module, encoder: nn.Module, x: jax.Array, train: bool, run: jax.Array | None = None
) -> EncoderOutput:
    """The encoder's features of ``x`` with the encoder's current variables, no gradient and no
    running-statistics update (see the module docstring).

    Args:
      parent: the calling module (draws the source pass's ``'dropout'`` key when it has one).
      encoder: the parent's bound encoder, already called once (its variables exist).
      x: (N, H, W, 3) normalised source images.
      train: training mode (batch statistics, stochastic depth).
      run: optional scalar bool; when false at run time the source pass is skipped
        (``lax.cond``) and zeros are returned, so steps without any FCP example cost nothing.
    """
    module, variables = encoder.unbind()
    variables = jax.lax.stop_gradient(variables)
    rngs = {"dropout": parent.make_rng("dropout")} if train and parent.has_rng("dropout") else {}

    def forward(images):
        out, _ = module.apply(variables, images, train, mutable=["batch_stats"], rngs=rngs)
        return jax.tree.map(jax.lax.stop_gradient, out)

    if run is None:
        return forward(x)
    shapes = jax.eval_shape(forward, x)
    return jax.lax.cond(run, forward, lambda _: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), x)


def apply_fcp(
    parent: nn.Module, encoder: nn.Module, target: EncoderOutput, fcp: dict[str, Any], train: bool
) -> EncoderOutput:
    """The model hook: encodes ``fcp["source_image"]`` and replaces the target features.

    ``fcp`` keys: ``source_image`` (N, H, W, 3) float normalised like the input, ``mask``
    (N, H, W, 1) float in [0, 1], ``apply`` (N,) bool, optional ``layers`` (static tuple of
    names, default `DEFAULT_FCP_LAYERS`). At init the target features are returned unchanged.
    """
    if parent.is_initializing():
        return target
    apply = jnp.asarray(fcp["apply"]).astype(bool)
    source = encode_source(parent, encoder, fcp["source_image"], train, run=jnp.any(apply))
    return replace_features(target, source, fcp["mask"], apply, fcp.get("layers", DEFAULT_FCP_LAYERS))


def fcp_inputs(
    batch: dict[str, jax.Array], step: jax.Array | int, start_step: int, layers: Sequence[str] = DEFAULT_FCP_LAYERS
) -> dict[str, Any]:
    """The ``fcp`` argument of `P3MNet.__call__` from a uint8 training batch (jittable).

    Uses the batch keys ``fcp_source`` (B, S, S, 3) uint8, ``fcp_mask`` (B, S, S, 1) uint8 and
    ``fcp_apply`` (B,) bool added by `p3m_jax.data.cp_transforms.FeatureCopyPasteInputs`;
    ``apply`` is additionally false before ``start_step``.
    """
    source = normalize_uint8(jnp.asarray(batch["fcp_source"]))
    mask = jnp.asarray(batch["fcp_mask"]).astype(jnp.float32) / 255.0
    apply = jnp.asarray(batch["fcp_apply"]).astype(bool) & (jnp.asarray(step) >= start_step)
    return {"source_image": source, "mask": mask, "apply": apply, "layers": check_layers(layers)}


__all__ = [
    "FCP_LAYERS",
    "DEFAULT_FCP_LAYERS",
    "replace_features",
    "mask_at",
    "encode_source",
    "apply_fcp",
    "fcp_inputs",
    "check_layers",
]
