"""P3M-Net(Swin-T) on P3M-10k with the paper's recipe (see p3m_jax/configs/p3m10k.py).

    python -m p3m_jax.main --config=p3m10k_swin_t --workdir=runs/p3m10k_swin_t \
        --config.data.data_dir=~/tensorflow_datasets
"""

from p3m_jax.configs import p3m10k


def get_config():
    return p3m10k.get_config("swin_t")
