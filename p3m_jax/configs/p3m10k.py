"""The paper's P3M-10k recipe, shared by the per-variant configs (`p3m10k_<arch>.py`).

Adam at a constant 1e-5, global batch 8, 150 epochs over the training images, seed 10007; per
sample a random crop of 512/768/1024 around a transition pixel half of the time, flip, resize to
512, trimap from a random 15-30 px elliptical dilate/erode. Unlike the authors' code, the best
checkpoint is chosen on a held-out slice of train, never on the test sets.
"""

import ml_collections

from p3m_jax.configs import default

NUM_TRAIN_IMAGES = 9421  # P3M-10k train split
VALIDATION_COUNT = 200  # held out of train for model selection
EPOCHS = 150
BATCH_SIZE = 8

# Where the authors' ImageNet backbones are expected (download them from the links in the
# authors' README, then point these at the files or override --config.init.pretrained_backbone).
PRETRAINED_BACKBONES = {
    "resnet34": "pretrained/r34mp_pretrained_imagenet.pth.tar",
    "swin_t": "pretrained/swin_t_stem_pooling_pretrained_imagenet.pth",
    "vitae_s": "pretrained/vitae_s_pretrained_imagenet.pth.tar",
}


STEPS_PER_EPOCH = (NUM_TRAIN_IMAGES - VALIDATION_COUNT) // BATCH_SIZE

# 24 GB cards: micro-batches per step that keep the paper's batch of 8, and the remat policy, such that the
# compiled step needs at most about half of 24 GiB (docs/training.md has the compiled figures; the other
# half is margin for the GPU's own fusions and convolution workspaces).
CONSUMER_GPU = {"resnet34": (1, "decoder"), "swin_t": (2, "decoder"), "vitae_s": (2, "decoder")}
CELEBAMASK_HQ = "~/data/CelebAMask-HQ"  # CelebA-HQ-img/ + CelebAMask-HQ-mask-anno/ (P3M-CP faces)


def consumer_gpu_config(arch: str) -> ml_collections.ConfigDict:
    """The paper's recipe for one 24 GB GPU: the same global batch of 8, in `CONSUMER_GPU` micro-batches."""
    config = get_config(arch)
    config.grad_accum_steps, config.remat = CONSUMER_GPU[arch]
    config.data.num_workers = 4  # a desktop's cores
    return config


def get_config(arch: str = "resnet34", copy_paste: bool = False) -> ml_collections.ConfigDict:
    if arch not in PRETRAINED_BACKBONES:
        # A KeyError would be read as a config field that does not exist: a ValueError names the argument.
        raise ValueError(
            f"unknown architecture {arch!r} (the argument after the recipe's colon, e.g. "
            f"--config=finetune_folder:vitae_s): one of {', '.join(PRETRAINED_BACKBONES)}"
        )
    config = default.get_config()
    config.arch = arch
    config.dtype = "bfloat16"  # bfloat16 compute on GPU/TPU (float32 params and Adam state)
    config.batch_size = BATCH_SIZE  # the paper's batch; raise it with the device count
    config.num_train_steps = EPOCHS * STEPS_PER_EPOCH

    config.optimizer.learning_rate = 1e-5  # the paper: Adam, lr 1e-5, constant
    config.optimizer.schedule = "constant"

    # The release with train fg/bg estimated at build time (`python -m tfds_p3m10k.build
    # --tfds_config=estimate_fg_bg`): the paper's composition loss needs them; the release has none.
    config.data.tfds_name = "p3m10k/estimate_fg_bg"
    config.data.build_synthetic = False
    config.data.image_size = 512
    config.data.crop_sizes = (512, 768, 1024)
    config.data.trimap_kernel_range = (15, 30)
    config.data.validation_count = VALIDATION_COUNT
    config.data.num_workers = 8  # grain worker processes per host: ~50 examples/s each

    config.log_every_steps = 100
    config.eval_every_steps = 5000
    config.checkpoint_every_steps = 5000
    config.keep_checkpoints = 3
    config.num_summary_images = 4
    config.eval.validation_strategy = "hybrid"
    config.eval.strategy = "hybrid"  # the paper's test strategy

    config.init.pretrained_backbone = PRETRAINED_BACKBONES[arch]

    if copy_paste:  # P3M-CP: normal CelebAMask-HQ faces pasted over the blurred ones
        for level in (config.copy_paste.icp, config.copy_paste.fcp):
            level.enabled = True
            level.prob = 0.5
            level.face_source = CELEBAMASK_HQ
            level.face_source_format = "celebamask_hq"
        config.copy_paste.fcp.start_step = 50 * STEPS_PER_EPOCH  # the paper's start epoch 50
    return config
