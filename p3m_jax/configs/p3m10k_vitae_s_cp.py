"""P3M-Net(ViTAE-S) on P3M-10k with P3M-CP: image- and feature-level copy and paste of normal faces.

    python -m p3m_jax.main --config=p3m10k_vitae_s_cp --workdir=runs/p3m10k_vitae_s_cp \
        --config.data.data_dir=~/tensorflow_datasets \
        --config.copy_paste.icp.face_source=~/data/CelebAMask-HQ \
        --config.copy_paste.fcp.face_source=~/data/CelebAMask-HQ
"""

from p3m_jax.configs import p3m10k


def get_config():
    return p3m10k.get_config("vitae_s", copy_paste=True)
