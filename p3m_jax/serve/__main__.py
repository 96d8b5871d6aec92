"""``python -m p3m_jax.serve``: see `p3m_jax.serve`."""

import sys

from p3m_jax.serve.cli import main

sys.exit(main())
