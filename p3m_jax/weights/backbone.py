"""ImageNet-pretrained backbones for training: fill a model's encoder from an authors' file.

    variables = init_variables(build_model(arch), rng)
    variables, report = load_backbone(config.model.pretrained_backbone, arch, variables)
    print(report.summary())

Supported files: the ResNet-34-mp ``.pth.tar``, the Swin-T stem-pooling backbone and the
ViTAE-S backbone (``{'state_dict_ema': ...}``). The encoder must be complete in the file;
classifier heads we do not build are ignored, the decoder (and non-trained constants such as
the Performer's random features) keep the values of ``variables``.
"""

from __future__ import annotations

import os
from typing import Any

from p3m_jax.weights.torch_import import ImportReport, convert_state_dict, read_torch_checkpoint


def load_backbone(path: str | os.PathLike, arch: str, variables: Any) -> tuple[dict, ImportReport]:
    """Loads an ImageNet-pretrained backbone into the encoder of ``variables``.

    Args:
      path: the authors' backbone checkpoint (``.pth``/``.pth.tar``; needs PyTorch to read).
      arch: "resnet34", "swin_t" or "vitae_s".
      variables: initialized variables of ``build_model(arch)`` (``params``, ``batch_stats``
        and, for ViTAE-S, ``constants``); everything the backbone does not hold keeps its value.

    Returns:
      ``(variables, report)``: the same structure with the encoder replaced (loaded tensors as
      numpy float32 arrays), and a report of what was loaded, left at init and ignored.

    Raises:
      FileNotFoundError, CheckpointImportError (naming the file and the offending keys).
    """
    state_dict = read_torch_checkpoint(path)
    return convert_state_dict(state_dict, arch, variables, backbone_only=True, source=os.fspath(path))
