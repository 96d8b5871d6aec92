"""The authors' public PyTorch train step (their model from a checkout of
github.com/ViTAE-Transformer/P3M-Net, imported at run time and never vendored; the section-4 losses
written in PyTorch; Adam), for timing beside ours.

The authors' code imports three helpers from ``timm`` (and torchvision in a utility module); when
those are not installed minimal stand-in modules are registered (`install_timm_stand_in`).
"""

from __future__ import annotations

import pathlib
import statistics
import sys
import time
import types

import numpy as np

from device_turns import wait_for_device_turn


def host_batch(batch: int, size: int, seed: int = 0) -> dict:
    """A random uint8 batch of the pipeline's host contract."""
    rng = np.random.default_rng(seed)
    u8 = lambda c: rng.integers(0, 256, (batch, size, size, c), dtype=np.uint8)
    return {
        "image": u8(3),
        "fg": u8(3),
        "bg": u8(3),
        "alpha": u8(1),
        "trimap": rng.choice(np.array([0, 128, 255], np.uint8), (batch, size, size, 1)),
        "has_fg_bg": np.ones(batch, bool),
    }


def install_timm_stand_in():
    """The three timm helpers the authors' model imports (DropPath, to_2tuple, trunc_normal_)
    and register_model, when timm is not installed; and an empty ``torchvision.transforms``
    (their util.py imports it for data code the model does not use) when torchvision is not."""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        tv = types.ModuleType("torchvision")
        tv.transforms = types.ModuleType("torchvision.transforms")
        sys.modules.update({"torchvision": tv, "torchvision.transforms": tv.transforms})
    try:
        import timm  # noqa: F401

        return
    except ImportError:
        pass
    import torch

    class DropPath(torch.nn.Module):
        def __init__(self, drop_prob=0.0):
            super().__init__()
            self.drop_prob = drop_prob

        def forward(self, x):
            if self.drop_prob == 0.0 or not self.training:
                return x
            keep = 1.0 - self.drop_prob
            mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
            return x * mask / keep

    def to_2tuple(x):
        return tuple(x) if isinstance(x, (tuple, list)) else (x, x)

    def trunc_normal_(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0):
        return torch.nn.init.trunc_normal_(tensor, mean, std, a, b)

    layers = types.ModuleType("timm.models.layers")
    layers.DropPath, layers.to_2tuple, layers.trunc_normal_ = DropPath, to_2tuple, trunc_normal_
    registry = types.ModuleType("timm.models.registry")
    registry.register_model = lambda fn: fn
    models = types.ModuleType("timm.models")
    models.layers, models.registry = layers, registry
    timm = types.ModuleType("timm")
    timm.models = models
    sys.modules.update(
        {"timm": timm, "timm.models": models, "timm.models.layers": layers, "timm.models.registry": registry}
    )


def _torch_loss(outputs, image, fg, bg, alpha, trimap):
    """docs/design.md section 4's loss in PyTorch (NCHW), for a like-for-like step."""
    import torch
    import torch.nn.functional as F

    glob, local, fusion, s2, s1, s0 = outputs
    labels = torch.where(trimap == 0, 0, torch.where(trimap == 255, 2, 1)).long()[:, 0]
    ce = lambda logits: F.cross_entropy(logits, labels)
    l_global = ce(s2) + ce(s1) + ce(s0) + 3 * ce(glob)
    g = torch.exp(-((torch.arange(5.0, device=alpha.device) - 2) ** 2))
    k = g[:, None] + g[None, :]
    k = (k / k.sum())[None, None]

    def pyramid(x):
        out = []
        for _ in range(5):
            f = F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), k)
            out.append(x - f)
            x = F.avg_pool2d(f, 2)
        return out + [x]

    def lap(p, a):
        return sum(F.l1_loss(u, v) for u, v in zip(pyramid(p), pyramid(a)))

    w = (trimap == 128).float()
    l_local = torch.sqrt(((local - alpha) * w) ** 2 + 1e-12).sum() / (w.sum() + 1) + lap(local * w, alpha * w)
    l_fusion = torch.sqrt((fusion - alpha) ** 2 + 1e-12).mean() + lap(fusion, alpha)
    comp = fusion * fg + (1 - fusion) * bg
    l_comp = torch.sqrt((comp - image) ** 2 + 1e-12).sum() / fusion[:, 0].numel()
    return l_global / 6 + 2 * l_local + 3 * l_fusion + l_comp


def make_torch_step(
    arch: str, size: int, batch: int, authors_repo: str, device: str = "cpu", precision: str = "float32"
):
    """One training step (forward, the section-4 loss, backward, Adam) of the authors' public
    PyTorch P3M-Net, as a callable returning the loss.

    ``device`` is "cpu" or "cuda". ``precision`` "float16" runs the network under
    ``torch.autocast`` (float16, with a gradient scaler) and the loss in float32, as our
    bfloat16 step does; "float32" is the authors' own setting. On CUDA, cuDNN picks its
    algorithms by benchmark (``cudnn.benchmark``), as XLA:GPU autotunes ours."""
    import torch

    if precision not in ("float32", "float16"):
        raise ValueError(f"torch precision must be float32 or float16, got {precision!r}")
    core = str(pathlib.Path(authors_repo) / "core")
    if not pathlib.Path(core, "network").is_dir():
        raise FileNotFoundError(
            f"--authors_repo {authors_repo}: no core/network folder (a checkout of "
            "github.com/ViTAE-Transformer/P3M-Net is expected)"
        )
    if core not in sys.path:
        sys.path.insert(0, core)
    install_timm_stand_in()
    from network import build_model as authors_build_model  # the authors' code, at run time

    name = {"resnet34": "r34", "swin_t": "swin", "vitae_s": "vitae"}[arch]
    kwargs = {"img_size": size} if arch == "swin_t" else {}
    # XLA:CPU flushes denormals to zero; PyTorch does not by default, and a randomly
    # initialised P3M-Net produces enough of them to slow its CPU kernels several times.
    torch.set_flush_denormal(True)
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    model = authors_build_model(name, pretrained=False, **kwargs).train().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)
    amp = precision == "float16"
    scaler = torch.amp.GradScaler(device, enabled=amp)
    hb = host_batch(batch, size)
    mean = torch.tensor([0.485, 0.456, 0.406])[None, :, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[None, :, None, None]
    nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
    norm = lambda a: ((nchw(a).float() / 255 - mean) / std).to(device)
    image, fg, bg = norm(hb["image"]), norm(hb["fg"]), norm(hb["bg"])
    alpha, trimap = (nchw(hb["alpha"]).float() / 255).to(device), nchw(hb["trimap"]).float().to(device)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.float16, enabled=amp):
            outputs = model(image)
        loss = _torch_loss([o.float() for o in outputs], image, fg, bg, alpha, trimap)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return float(loss.detach())  # waits for the device

    return step


def bench_torch(arch: str, size: int, batch: int, repeats: int, authors_repo: str, device: str, precision: str) -> dict:
    """Times the authors' step alone (``--torch_only``): median of ``repeats`` after two warm-ups,
    images/s and, on CUDA, the peak memory PyTorch allocated."""
    import torch

    wait_for_device_turn()  # before the model takes device memory
    step = make_torch_step(arch, size, batch, authors_repo, device, precision)
    row = {"arch": arch, "impl": "authors_pytorch", "device": device, "precision": precision, "batch": batch}
    try:
        for _ in range(2):
            step()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            loss = step()
            times.append(time.perf_counter() - t0)
    except torch.OutOfMemoryError as err:
        row["error"] = f"out of memory: {str(err).splitlines()[0]}"
        return row
    row.update(step_s=statistics.median(times), loss=loss, images_per_s=batch / statistics.median(times))
    if device == "cuda":
        row["peak_memory"] = int(torch.cuda.max_memory_allocated())
    return row
