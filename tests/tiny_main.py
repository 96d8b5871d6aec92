"""`python -m p3m_jax.main` with the small stand-in model of tests/train_helpers.py, for the tests of the
training loop that run it as a user would (signals, kills, exit codes) without compiling a real network.

    python tests/tiny_main.py --config=default --workdir=... [--config.<field>=...]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.train_helpers import use_tiny_model  # noqa: E402

use_tiny_model()

from p3m_jax import main  # noqa: E402

main.run()
