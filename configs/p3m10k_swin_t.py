"""P3M-Net(Swin-T) on P3M-10k with the paper's recipe (see configs/p3m10k.py).

    python -m p3m_jax.main --config=configs/p3m10k_swin_t.py --workdir=runs/p3m10k_swin_t \
        --config.data.data_dir=~/tensorflow_datasets
"""

from configs import p3m10k


def get_config():
    return p3m10k.get_config("swin_t")
