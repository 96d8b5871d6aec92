"""Import of the authors' PyTorch checkpoints into p3m-jax variables.

The Flax modules are named after the authors' PyTorch attributes, so a state-dict key maps to
a Flax variable by a per-architecture prefix rule plus a generic leaf rule:

    <module path>.weight   4-D  -> params/<path>/kernel   (OIHW -> HWIO)
    <module path>.weight   2-D  -> params/<path>/kernel   (out, in -> in, out)
    <module path>.weight   1-D  -> params/<path>/scale    (BatchNorm / LayerNorm)
    <module path>.bias          -> params/<path>/bias
    <module path>.running_mean  -> batch_stats/<path>/mean
    <module path>.running_var   -> batch_stats/<path>/var
    <module path>.<other>       -> params/<path>/<other>  (e.g. relative_position_bias_table)

Everything is checked against the freshly initialized variables of the target model: keys
that map nowhere, variables that no key fills, and shape mismatches all fail with a message
that names them. Reading a ``.pth`` needs PyTorch (the ``torch`` extra); nothing else here does.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
from typing import Any, Callable, Mapping

import numpy as np

from p3m_jax.common import storage

# Keys whose tensors are derived from the configuration and recomputed by our modules.
_ALWAYS_IGNORED_LEAVES = ("num_batches_tracked", "relative_position_index", "attn_mask")


class CheckpointImportError(ValueError):
    """A state dict does not fit the target architecture (unknown/missing/mis-shaped keys)."""


@dataclasses.dataclass(frozen=True)
class KeyRules:
    """How one architecture's PyTorch keys map to Flax module paths.

    rename: maps a full PyTorch key to a dotted Flax module path + leaf (e.g.
      ``"encoder.layer1.0.conv1.weight"``), or None when the key is to be ignored.
    special_leaf: optional hook ``(flax_key, array) -> (collection, leaf, array) | None`` for
      leaves that the generic rule does not cover (e.g. fixed random features); return None to
      fall back to the generic rule.
    """

    rename: Callable[[str], str | None]
    special_leaf: Callable[[str, np.ndarray], tuple[str, str, np.ndarray] | None] | None = None


def _resnet34_rename(key: str) -> str | None:
    # The authors' ResNet P3M-Net registers every encoder tensor twice: once under the
    # backbone ("resnet.") and once under the nn.Sequential views "encoder0".."encoder4".
    if key.startswith("resnet."):
        return "encoder." + key[len("resnet.") :]
    m = re.match(r"encoder0\.(\d+)\.(.*)", key)
    if m:
        module = {"0": "conv1", "1": "bn1"}.get(m.group(1))
        return None if module is None else f"encoder.{module}.{m.group(2)}"
    m = re.match(r"encoder1\.0\.(.*)", key)  # encoder1 = nn.Sequential(resnet.layer1)
    if m:
        return f"encoder.layer1.{m.group(1)}"
    m = re.match(r"encoder([234])\.(.*)", key)
    if m:
        return f"encoder.layer{m.group(1)}.{m.group(2)}"
    return "decoder." + key


def _resnet34_backbone_rename(key: str) -> str | None:
    # An ImageNet r34mp backbone: bare torchvision-style keys ("conv1.weight", "layer1.0...").
    return "encoder." + key


def _transformer_rename(key: str) -> str | None:
    # The Swin-T and ViTAE-S P3M-Nets are named "encoder.*"/"decoder.*" exactly as our modules.
    if key.startswith(("encoder.", "decoder.")):
        return key
    return "unexpected." + key  # reported as an unknown key


def _swin_t_backbone_rename(key: str) -> str | None:
    # An ImageNet Swin-T stem-pooling backbone: bare keys ("patch_embed.proj1.weight",
    # "layers.0.blocks.0..."); its classifier head (if any) has no counterpart here.
    if key.startswith("head."):
        return None
    return "encoder." + key


def _vitae_s_backbone_rename(key: str) -> str | None:
    # An ImageNet ViTAE-S backbone ("state_dict_ema": bare "layers.*" and "head.*" keys). The
    # head is part of the authors' P3M-Net encoder (and of ours, unused), so it is loaded too.
    return "encoder." + key


def _performer_features_leaf(dotted: str, value: np.ndarray):
    # The Performer's random features ("...attn.w", (heads, m, head_dim)) are a plain tensor
    # attribute in the authors' code; when a state dict carries them they are our constants.
    if dotted.endswith(".attn.w") and value.ndim == 3:
        return "constants", "w", value
    return None


ARCH_RULES: dict[str, KeyRules] = {
    "resnet34": KeyRules(_resnet34_rename),
    "swin_t": KeyRules(_transformer_rename),
    "vitae_s": KeyRules(_transformer_rename, special_leaf=_performer_features_leaf),
}
BACKBONE_RULES: dict[str, KeyRules] = {
    "resnet34": KeyRules(_resnet34_backbone_rename),
    "swin_t": KeyRules(_swin_t_backbone_rename),
    "vitae_s": KeyRules(_vitae_s_backbone_rename, special_leaf=_performer_features_leaf),
}


def read_torch_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a ``.pth``/``.pth.tar`` file into a flat ``{key: float32 numpy array}`` dict.

    Accepts a bare state dict or a dict holding one under ``state_dict``, ``state_dict_ema``,
    ``model`` or ``model_state_dict``; a leading ``module.`` (DataParallel) is stripped.
    """
    path = storage.resolve(path)
    with storage.reported(path, "reading"):
        found = path.is_file()
    if not found:
        raise FileNotFoundError(f"PyTorch checkpoint not found: {path}")
    try:
        import torch  # pylint: disable=import-outside-toplevel
    except ImportError as e:
        raise ImportError(
            "reading a PyTorch checkpoint needs PyTorch: pip install 'p3m-jax[torch]' (the CPU build is enough)"
        ) from e
    try:
        # A local file is read by torch itself; a gs:// object through memory.
        source = io.BytesIO(path.read_bytes()) if storage.is_remote(path) else os.fspath(path)
        obj = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated or foreign files
        raise CheckpointImportError(f"cannot read {path} as a PyTorch checkpoint: {e}") from e
    return state_dict_to_numpy(obj, source=os.fspath(path))


def state_dict_to_numpy(obj: Any, source: str = "state dict") -> dict[str, np.ndarray]:
    """Unwraps a loaded checkpoint object into ``{key: numpy array}``."""
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "state_dict_ema", "model", "model_state_dict"):
            if wrapper in obj and isinstance(obj[wrapper], Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointImportError(f"{source} holds no state dict (got {type(obj).__name__})")
    out = {}
    for key, value in obj.items():
        if not hasattr(value, "shape"):
            raise CheckpointImportError(f"{source}: entry {key!r} is not a tensor ({type(value).__name__})")
        if hasattr(value, "detach"):
            value = value.detach().cpu()
            if value.is_floating_point():
                value = value.float()
            value = value.numpy()
        key = key[len("module.") :] if key.startswith("module.") else key
        out[key] = np.asarray(value)
    return out


def _flatten(tree: Mapping, prefix: tuple = ()) -> dict[tuple, Any]:
    flat = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            flat.update(_flatten(v, prefix + (k,)))
        else:
            flat[prefix + (k,)] = v
    return flat


def _unflatten(flat: Mapping[tuple, Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value
    return tree


def _generic_leaf(leaf: str, value: np.ndarray) -> tuple[str, str, np.ndarray]:
    if leaf == "weight":
        if value.ndim == 4:
            return "params", "kernel", value.transpose(2, 3, 1, 0)
        if value.ndim == 2:
            return "params", "kernel", value.T
        if value.ndim == 1:
            return "params", "scale", value
    if leaf == "running_mean":
        return "batch_stats", "mean", value
    if leaf == "running_var":
        return "batch_stats", "var", value
    return "params", leaf, value


@dataclasses.dataclass
class ImportReport:
    """What an import did: variables loaded, left at their initial values, keys ignored."""

    loaded: list[str]
    left_at_init: list[str]
    ignored: list[str]

    def summary(self) -> str:
        lines = [
            f"loaded {len(self.loaded)} tensors; {len(self.left_at_init)} variables left at "
            f"init; {len(self.ignored)} checkpoint keys ignored"
        ]
        if self.left_at_init:
            groups = sorted({"/".join(p.split("/")[:3]) for p in self.left_at_init})
            lines.append("left at init: " + ", ".join(groups[:20]) + (" ..." if len(groups) > 20 else ""))
        if self.ignored:
            lines.append("ignored: " + ", ".join(self.ignored[:20]) + (" ..." if len(self.ignored) > 20 else ""))
        return "\n".join(lines)


def _listing(items, limit=15) -> str:
    items = sorted(items)
    text = ", ".join(items[:limit])
    return text + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def convert_state_dict(
    state_dict: Mapping[str, np.ndarray],
    arch: str,
    reference: Mapping,
    *,
    backbone_only: bool = False,
    source: str = "state dict",
) -> tuple[dict, ImportReport]:
    """Maps an authors' state dict onto ``reference`` (initialized variables of ``arch``).

    Args:
      state_dict: flat ``{torch key: numpy array}``.
      arch: "resnet34", "swin_t" or "vitae_s".
      reference: the target model's variables, concrete or abstract (``jax.eval_shape`` of
        its init): they give every name, shape and dtype. Entries left at init are taken from
        ``reference`` as they are, so pass concrete values when some may be left at init.
      backbone_only: the state dict is an ImageNet-pretrained backbone: only the encoder is
        filled and the decoder keeps its initial values; the architecture's backbone rules
        decide which keys (e.g. a classifier head we do not build) are ignored, and the report
        lists them.
      source: name of the checkpoint for error messages.

    Returns:
      ``(variables, report)``; variables has the same structure as ``reference``.

    Raises:
      CheckpointImportError: naming unknown keys, missing variables, mis-shaped or conflicting
        tensors.
    """
    rules_table = BACKBONE_RULES if backbone_only else ARCH_RULES
    if arch not in rules_table:
        kind = "backbone" if backbone_only else "P3M-Net"
        raise CheckpointImportError(f"no {kind} import rules for arch {arch!r}")
    rules = rules_table[arch]
    ref_flat = {"/".join(k): v for k, v in _flatten(reference).items()}
    converted: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    unknown, ignored, bad_shape, conflicts = [], [], [], []
    for key, value in state_dict.items():
        leaf_name = key.rsplit(".", 1)[-1]
        if leaf_name in _ALWAYS_IGNORED_LEAVES:
            ignored.append(key)
            continue
        dotted = rules.rename(key)
        if dotted is None:
            ignored.append(key)
            continue
        module_path, leaf = dotted.rsplit(".", 1) if "." in dotted else ("", dotted)
        special = rules.special_leaf(dotted, value) if rules.special_leaf else None
        collection, new_leaf, new_value = special or _generic_leaf(leaf, value)
        flax_key = "/".join([collection] + module_path.split(".") + [new_leaf])
        if flax_key not in ref_flat:
            unknown.append(key)
            continue
        ref_shape = tuple(ref_flat[flax_key].shape)
        if tuple(new_value.shape) != ref_shape:
            bad_shape.append(f"{key} {tuple(value.shape)} (expected {_torch_shape(ref_shape, leaf)})")
            continue
        # Cast before comparing duplicates: a float64 state dict's copies are equal as float64.
        new_value = np.asarray(new_value, dtype=ref_flat[flax_key].dtype)
        if flax_key in converted:
            if not np.array_equal(converted[flax_key], new_value):
                conflicts.append(f"{origin[flax_key]} vs {key}")
            continue
        converted[flax_key] = new_value
        origin[flax_key] = key
    missing = [k for k in ref_flat if k not in converted]
    # Non-trained constants (e.g. random features) that a checkpoint may lack are drawn at
    # init; with a backbone the decoder is trained from scratch, but the encoder must be full.
    left_at_init = [
        k
        for k in missing
        if k.split("/")[0] not in ("params", "batch_stats") or (backbone_only and k.split("/")[1:2] != ["encoder"])
    ]
    missing = [k for k in missing if k not in left_at_init]
    problems = []
    if unknown:
        problems.append(f"unknown keys: {_listing(unknown)}")
    if bad_shape:
        problems.append(f"mis-shaped tensors: {_listing(bad_shape)}")
    if conflicts:
        problems.append(f"duplicate keys with different values: {_listing(conflicts)}")
    if missing:
        problems.append(f"variables not found in the checkpoint: {_listing(missing)}")
    if problems:
        raise CheckpointImportError(
            f"{source} does not match the {arch} P3M-Net"
            f"{' encoder' if backbone_only else ''}:\n  " + "\n  ".join(problems)
        )
    merged = {k: converted.get(k, v) for k, v in ref_flat.items()}
    # Abstract entries (jax.ShapeDtypeStruct) stay abstract for the caller to fill from init.
    variables = _unflatten({tuple(k.split("/")): v if k not in converted else converted[k] for k, v in merged.items()})
    return variables, ImportReport(sorted(origin.values()), sorted(left_at_init), sorted(ignored))


def _torch_shape(flax_shape: tuple, leaf: str) -> tuple:
    """The PyTorch shape that corresponds to a Flax variable shape (for error messages)."""
    if leaf == "weight" and len(flax_shape) == 4:
        h, w, i, o = flax_shape
        return (o, i, h, w)
    if leaf == "weight" and len(flax_shape) == 2:
        return tuple(reversed(flax_shape))
    return flax_shape
