"""A PyTorch reference of the three P3M-Nets in training mode, written for the tests from the
network's description (not the authors' code), reading an authors'-layout state dict.

`TorchP3MNet(state_dict, arch)(image_nchw)` runs the whole network on torch tensors: the
parameters are the state dict's tensors (make them ``requires_grad`` to get gradients), the
BatchNorms use the batch statistics and update the ``running_mean``/``running_var`` tensors of
the state dict in place (PyTorch's ``F.batch_norm(training=True)``), and max-pooling/unpooling
are PyTorch's own ``max_pool2d(return_indices=True)``/``max_unpool2d``. Swin-T's stochastic depth
is off. The decoder widths come from `p3m_jax.models.decoder`'s specs; which layer exists is
checked by the state dict (a missing key raises KeyError).

Key names are the authors': ``encoder.*``/``decoder.*`` for the transformer variants; for
ResNet-34 the encoder under ``resnet.*`` and the decoder's modules at the top level.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from p3m_jax.models.decoder import RESNET34_DECODER, SWIN_T_DECODER, VITAE_S_DECODER
from torch_refs import torch_window_mask

SPECS = {"resnet34": RESNET34_DECODER, "swin_t": SWIN_T_DECODER, "vitae_s": VITAE_S_DECODER}


def authors_state_dict(variables, arch: str) -> dict[str, np.ndarray]:
    """Flax variables of a P3M-Net under the authors' key names and tensor layouts (the inverse
    of `p3m_jax.weights.torch_import`'s rules; ResNet-34's ``encoder0..4`` aliases left out)."""
    import jax

    sd = {}
    for path, v in jax.tree_util.tree_flatten_with_path(variables)[0]:
        names = [p.key for p in path]
        module, leaf = ".".join(names[1:-1]), names[-1]
        if arch == "resnet34":
            module = (
                "resnet." + module[len("encoder.") :] if module.startswith("encoder.") else module[len("decoder.") :]
            )
        v = np.asarray(v)
        if leaf == "kernel":
            sd[module + ".weight"] = v.transpose(3, 2, 0, 1) if v.ndim == 4 else v.T
        elif leaf == "scale":
            sd[module + ".weight"] = v
        elif leaf in ("mean", "var"):
            sd[module + ".running_" + leaf] = v
        else:
            sd[module + "." + leaf] = v
    return sd


def nhwc(x):
    return x.permute(0, 2, 3, 1)


def nchw(x):
    return x.permute(0, 3, 1, 2)


def torch_tensors(state_dict, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Copies of a numpy state dict as contiguous torch tensors of ``dtype``."""
    return {k: torch.from_numpy(np.array(v)).to(dtype) for k, v in state_dict.items()}


def module_reference(variables, train: bool = False) -> "TorchP3MNet":
    """A reference over the variables of one module (a block test), its keys under ``m.``:
    e.g. ``module_reference(v).swin_block(x, "m", 7, 3)``."""
    wrapped = {collection: {"m": tree} for collection, tree in variables.items()}
    return TorchP3MNet(torch_tensors(authors_state_dict(wrapped, "swin_t")), "swin_t", train)


class TorchP3MNet:
    """The reference network (see the module docstring); ``train=False`` normalises with the
    running statistics instead."""

    def __init__(self, state_dict: dict[str, torch.Tensor], arch: str, train: bool = True):
        self.sd = state_dict
        self.arch = arch
        self.train = train
        self.spec = SPECS[arch]
        self.enc = "resnet." if arch == "resnet34" else "encoder."
        self.dec = "" if arch == "resnet34" else "decoder."

    # ------------------------------------------------------------------ layers
    def conv(self, x, name, groups=1):
        w = self.sd[name + ".weight"]
        return F.conv2d(x, w, self.sd.get(name + ".bias"), padding=w.shape[-1] // 2, groups=groups)

    def bn(self, x, name):
        return F.batch_norm(
            x,
            self.sd[name + ".running_mean"],
            self.sd[name + ".running_var"],
            self.sd[name + ".weight"],
            self.sd[name + ".bias"],
            training=self.train,
            momentum=0.1,
            eps=1e-5,
        )

    def ln(self, x, name, eps=1e-5):
        return F.layer_norm(x, (x.shape[-1],), self.sd[name + ".weight"], self.sd[name + ".bias"], eps)

    def linear(self, x, name):
        return F.linear(x, self.sd[name + ".weight"], self.sd.get(name + ".bias"))

    def mlp(self, x, name):
        return self.linear(F.gelu(self.linear(x, name + ".fc1")), name + ".fc2")

    # ------------------------------------------------------------------ the network
    def __call__(self, image):
        encoder = {"resnet34": self.resnet34, "swin_t": self.swin_t, "vitae_s": self.vitae_s}
        deep, feats, indices = encoder[self.arch](image)
        return self.decoder(deep, feats, indices)

    def decoder(self, x, feats, idx):
        d = self.dec
        _, _, w2, w1, w0, _ = self.spec.widths

        def block(level, branch, v):
            widths = self.spec.block_widths(level, branch)
            name = f"{d}decoder{level}_{branch[0]}"
            for i in range(len(widths)):
                v = self.conv(v, f"{name}.{3 * i}")
                if level == 0 and branch == "global" and i == len(widths) - 1:
                    break
                v = F.relu(self.bn(v, f"{name}.{3 * i + 1}"))
            return v

        def up(v, factor=2):
            return F.interpolate(v, scale_factor=factor, mode="bilinear", align_corners=False)

        def unpool(v, k):
            return F.max_unpool2d(v, idx[k], kernel_size=2, stride=2)

        def tfi(name, g, loc, e):
            t = lambda v: self.conv(v, f"{d}{name}.transform")  # noqa: E731
            return F.relu(self.bn(self.conv(torch.cat([t(g), t(loc), t(e)], 1), f"{d}{name}.conv1"), f"{d}{name}.bn1"))

        def sbfi(name, loc, stride):
            a = self.conv(loc, f"{d}{name}.transform1")
            b = self.conv(F.max_pool2d(feats[0], 2, stride), f"{d}{name}.transform2")
            v = F.relu(self.bn(self.conv(torch.cat([a, b], 1), f"{d}{name}.conv1"), f"{d}{name}.bn1"))
            return v + loc

        def dbfi(name, g, stride):
            a = self.conv(g, f"{d}{name}.transform1")
            b = up(self.conv(x, f"{d}{name}.transform2"), stride)
            v = F.relu(self.bn(self.conv(torch.cat([a, b], 1), f"{d}{name}.conv1"), f"{d}{name}.bn1"))
            v = v + g
            return v, up(self.conv(v, f"{d}{name}.conv2"), 32 // stride)

        d4_g = up(block(4, "global", x))
        d3_g = up(block(3, "global", d4_g))
        d2_g, side2 = dbfi("dbfi_2", d3_g, 4)
        d2_g = up(block(2, "global", d2_g))
        d1_g, side1 = dbfi("dbfi_1", d2_g, 8)
        d1_g = up(block(1, "global", d1_g))
        d0_g, side0 = dbfi("dbfi_0", d1_g, 16)
        global_logits = up(block(0, "global", d0_g))
        if self.spec.global_head_conv:
            global_logits = self.conv(global_logits, f"{d}decoder_final_g")

        d4_l = unpool(block(4, "local", x), 4)
        d3_l = tfi("tfi_3", d4_g, d4_l, feats[4])
        d3_l = unpool(block(3, "local", d3_l), 3)
        d2_l = sbfi("sbfi_2", tfi("tfi_2", d3_g, d3_l, feats[3]), 8)
        d2_l = unpool(block(2, "local", d2_l), 2)
        d1_l = sbfi("sbfi_1", tfi("tfi_1", d2_g, d2_l, feats[2]), 4)
        d1_l = unpool(block(1, "local", d1_l), 1)
        d0_l = sbfi("sbfi_0", tfi("tfi_0", d1_g, d1_l, feats[1]), 2)
        d0_l = unpool(block(0, "local", d0_l), 0)
        local = torch.sigmoid(self.conv(d0_l, f"{d}decoder_final_l"))

        cls = global_logits.argmax(1, keepdim=True)
        fusion = local * (cls == 1).to(local.dtype) + (cls == 2).to(local.dtype)
        outs = {
            "global": global_logits,
            "local": local,
            "fusion": fusion,
            "side2": side2,
            "side1": side1,
            "side0": side0,
        }
        return {k: nhwc(v) for k, v in outs.items()}

    # ------------------------------------------------------------------ ResNet-34-mp
    def resnet34(self, x):
        e = self.enc
        e0 = F.relu(self.bn(self.conv(x, e + "conv1"), e + "bn1"))
        e0p, id0 = F.max_pool2d(e0, 3, 2, 1, return_indices=True)
        h, id1 = F.max_pool2d(e0p, 3, 2, 1, return_indices=True)
        feats, indices = [e0, e0p], [id0, id1]
        for layer in range(1, 5):
            block = 0
            while f"{e}layer{layer}.{block}.conv1.weight" in self.sd:
                h = self.basic_block(h, f"{e}layer{layer}.{block}")
                block += 1
            if layer < 5 - 1:
                feats.append(h)
                h, ind = F.max_pool2d(h, 3, 2, 1, return_indices=True)
                indices.append(ind)
        return h, feats, indices

    def basic_block(self, x, name):
        out = F.relu(self.bn(self.conv(x, name + ".conv1"), name + ".bn1"))
        out = self.bn(self.conv(out, name + ".conv2"), name + ".bn2")
        if name + ".downsample.0.weight" in self.sd:
            x = self.bn(self.conv(x, name + ".downsample.0"), name + ".downsample.1")
        return F.relu(out + x)

    # ------------------------------------------------------------------ transformers
    def stem(self, x, name, relu_last):
        """Conv stem with two 2x2 max-poolings; NHWC tokens and NCHW features."""
        f0 = F.relu(self.conv(x, name + ".proj1"))
        y, i0 = F.max_pool2d(f0, 2, 2, return_indices=True)
        f1 = F.relu(self.conv(y, name + ".proj2"))
        y, i1 = F.max_pool2d(f1, 2, 2, return_indices=True)
        y = self.conv(y, name + ".proj3")
        y = F.relu(y) if relu_last else y
        return self.ln(nhwc(y), name + ".norm"), [f0, f1], [i0, i1]

    def pooling_merge(self, x, name):
        """LayerNorm (the skip feature), 2x2 max-pooling with indices, Linear without bias."""
        feature = nchw(self.ln(x, name + ".norm"))
        pooled, idx = F.max_pool2d(feature, 2, 2, return_indices=True)
        return self.linear(nhwc(pooled), name + ".linear"), feature, idx

    def swin_t(self, x, window=7):
        e = self.enc
        x, feats, indices = self.stem(x, e + "patch_embed", relu_last=True)
        stage = 0
        while f"{e}layers.{stage}.blocks.0.norm1.weight" in self.sd:
            block = 0
            while f"{e}layers.{stage}.blocks.{block}.norm1.weight" in self.sd:
                x = self.swin_block(
                    x, f"{e}layers.{stage}.blocks.{block}", window, 0 if block % 2 == 0 else window // 2
                )
                block += 1
            if f"{e}layers.{stage}.downsample.linear.weight" in self.sd:
                x, feat, idx = self.pooling_merge(x, f"{e}layers.{stage}.downsample")
                feats.append(feat)
                indices.append(idx)
            stage += 1
        return nchw(self.ln(x, e + "norm")), feats, indices

    def swin_block(self, x, name, window, shift):
        b, h, w, c = x.shape
        table = self.sd[name + ".attn.relative_position_bias_table"]
        heads = table.shape[1]
        hd = c // heads
        y = self.ln(x, name + ".norm1")
        ph, pw = (-h) % window, (-w) % window
        y = F.pad(y, (0, 0, 0, pw, 0, ph))
        hp, wp = h + ph, w + pw
        if shift:
            y = torch.roll(y, (-shift, -shift), (1, 2))
        win = y.reshape(b, hp // window, window, wp // window, window, c).permute(0, 1, 3, 2, 4, 5)
        n = window * window
        win = win.reshape(-1, n, c)
        qkv = self.linear(win, name + ".attn.qkv").reshape(-1, n, 3, heads, hd).permute(2, 0, 3, 1, 4)
        attn = (qkv[0] * hd**-0.5) @ qkv[1].transpose(-2, -1)
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + window - 1
        index = rel[..., 0] * (2 * window - 1) + rel[..., 1]
        attn = attn + table[index.reshape(-1)].reshape(n, n, heads).permute(2, 0, 1)[None]
        if shift or ph or pw:
            mask = torch_window_mask(h, w, window, shift).to(attn.dtype)
            nw = mask.shape[0]
            attn = (attn.reshape(-1, nw, heads, n, n) + mask[None, :, None]).reshape(-1, heads, n, n)
        out = (attn.softmax(-1) @ qkv[2]).transpose(1, 2).reshape(-1, n, c)
        out = self.linear(out, name + ".attn.proj")
        out = out.reshape(b, hp // window, wp // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
        out = out.reshape(b, hp, wp, c)
        if shift:
            out = torch.roll(out, (shift, shift), (1, 2))
        x = x + out[:, :h, :w]
        return x + self.mlp(self.ln(x, name + ".norm2"), name + ".mlp")

    def vitae_s(self, x, groups=(1, 32, 64, 128), heads=(1, 2, 4, 8)):
        e = self.enc
        x, feats, indices = self.stem(x, e + "layers.0.RC", relu_last=False)
        stage = 0
        while f"{e}layers.{stage}.NC.0.norm1.weight" in self.sd:
            if stage > 0:
                x, feat, idx = self.pooling_merge(x, f"{e}layers.{stage}.RC")
                feats.append(feat)
                indices.append(idx)
            cell = 0
            while f"{e}layers.{stage}.NC.{cell}.norm1.weight" in self.sd:
                x = self.normal_cell(x, f"{e}layers.{stage}.NC.{cell}", groups[stage], heads[stage])
                cell += 1
            stage += 1
        return nchw(x), feats, indices

    def pcm(self, x, name, groups):
        """The parallel convolution branch (NCHW): conv, BN, SiLU, conv, BN, SiLU, conv, SiLU."""
        x = F.silu(self.bn(self.conv(x, name + ".0", groups), name + ".1"))
        x = F.silu(self.bn(self.conv(x, name + ".3", groups), name + ".4"))
        return F.silu(self.conv(x, name + ".6", groups))

    def normal_cell(self, x, name, groups, heads):
        """x + Attn(LN(x)) + PCM(x), then x + MLP(LN(x)); the Performer where ``attn.w`` exists."""
        b, h, w, c = x.shape
        conv_x = self.pcm(nchw(x), name + ".PCM", groups)
        tokens = self.ln(x, name + ".norm1", 1e-6).reshape(b, h * w, c)
        if name + ".attn.w" in self.sd:
            attn = self.performer(tokens, name + ".attn")
        else:
            attn = self.attention(tokens, name + ".attn", heads)
        x = x + attn.reshape(b, h, w, c) + nhwc(conv_x)
        return x + self.mlp(self.ln(x, name + ".norm2", 1e-6), name + ".mlp")

    def attention(self, x, name, heads):
        b, n, c = x.shape
        hd = c // heads
        qkv = self.linear(x, name + ".qkv").reshape(b, n, 3, heads, hd).permute(2, 0, 3, 1, 4)
        attn = ((qkv[0] @ qkv[1].transpose(-2, -1)) * hd**-0.5).softmax(-1)
        return self.linear((attn @ qkv[2]).transpose(1, 2).reshape(b, n, c), name + ".proj")

    def performer(self, x, name):
        """Linear attention with positive random features ``w`` (heads, m, head_dim)."""
        w = self.sd[name + ".w"]
        b, n, c = x.shape
        heads, m, hd = w.shape
        kqv = self.linear(x, name + ".kqv").reshape(b, n, 3, heads, hd).permute(2, 0, 3, 1, 4)
        k, q, v = kqv[0], kqv[1], kqv[2]

        def features(z):
            return torch.exp(torch.einsum("bhti,hmi->bhtm", z, w) - (z * z).sum(-1, keepdim=True) / 2) / math.sqrt(m)

        kp, qp = features(k), features(q)
        normalizer = torch.einsum("bhti,bhi->bht", qp, kp.sum(dim=2)).unsqueeze(-1)
        kptv = torch.einsum("bhin,bhim->bhnm", v, kp)
        y = torch.einsum("bhti,bhni->bhtn", qp, kptv) / (normalizer + 1e-8)
        return self.linear(y.permute(0, 2, 1, 3).reshape(b, n, c), name + ".proj")
