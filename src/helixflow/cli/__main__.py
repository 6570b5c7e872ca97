"""``python -m helixflow.cli``: the ``helixflow`` command, run by a given interpreter."""

import sys

from helixflow.cli import main

sys.exit(main())
