"""Fine-tune a trained P3M-Net on a folder build of your own portraits, then score its test split.

    python -m tfds_p3m10k.build --folder=~/my_portraits --name=mine --data_dir=~/tensorflow_datasets \
        --anonymize=blur
    python -m p3m_jax.main --config=finetune_folder:vitae_s --workdir=runs/mine \
        --config.data.tfds_name=portrait_folder/mine --config.data.data_dir=~/tensorflow_datasets \
        --config.init.checkpoint=P3M-Net_ViTAE-S_trained_on_P3M-10k.pth

The argument after the colon is the architecture of the checkpoint: resnet34 (also without a colon),
swin_t or vitae_s, as in `--config=finetune_folder:vitae_s`;
`init.checkpoint` is an authors' `.pth` or a p3m-jax checkpoint (empty: train from random weights).
The paper's augmentation and optimiser (p3m10k.py), 2,000 steps by default; the best checkpoint is kept
on a held-out tenth of the train split (chosen by a hash of each name) and scored on the build's `test`
split at the end. P3M-CP on top: `--config.copy_paste.icp.enabled=True` (and `.fcp.enabled=True`), with
`face_source` a folder of normal faces (the build stores the facemasks the faces are pasted over).
"""

from p3m_jax.configs import p3m10k


def get_config(arch: str = "resnet34"):
    config = p3m10k.get_config(arch)
    config.data.tfds_name = "portrait_folder/mine"  # the name given to `python -m tfds_p3m10k.build --name`
    config.data.validation_count = 0
    config.data.validation_fraction = 0.1  # of the train split, held out for choosing the best checkpoint
    config.init.pretrained_backbone = ""
    config.init.checkpoint = ""  # the model to start from: an authors' .pth or a p3m-jax checkpoint
    config.num_train_steps = 2000
    config.log_every_steps = 20
    config.eval_every_steps = 250
    config.checkpoint_every_steps = 250
    config.eval.test_splits = ("test",)
    return config
