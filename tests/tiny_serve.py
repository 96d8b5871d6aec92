"""`python -m p3m_jax.serve` with the small stand-in model of tests/train_helpers.py, for the tests of the
server (tests/test_serve.py) that run it as a user would without compiling a real network.

    python tests/tiny_serve.py --checkpoint CKPT --port PORT [...]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.train_helpers import use_tiny_model  # noqa: E402

use_tiny_model()

from p3m_jax.serve.cli import main  # noqa: E402

sys.exit(main())
