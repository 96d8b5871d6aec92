"""P3M-Net(ResNet-34) on P3M-10k with the paper's recipe on one 24 GB GPU (see p3m_jax/configs/p3m10k.py):
the same global batch of 8, in the micro-batches of `p3m10k.CONSUMER_GPU`.

    XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 python -m p3m_jax.main --config=p3m10k_resnet34_24gb \
        --workdir=runs/p3m10k_resnet34_24gb --config.data.data_dir=~/tensorflow_datasets

Before the first step the run prints what the compiled step needs and what the card has, and stops with
a setting that fits when it does not.
"""

from p3m_jax.configs import p3m10k


def get_config():
    return p3m10k.consumer_gpu_config("resnet34")
