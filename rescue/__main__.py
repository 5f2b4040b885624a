"""``python -m rescue``: the same command line as the ``rescue`` script (``rescue.cli:main``).

For environments where the console script is not on ``PATH`` (a venv that is not activated, a
container with another entry point); help texts still say ``rescue``.
"""

from __future__ import annotations

import sys

from rescue.cli import main

if __name__ == "__main__":
    sys.exit(main())
