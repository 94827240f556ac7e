"""``python -m llama_mini COMMAND ...``: the ``llama-mini`` command without the console script."""

import sys

from .cli import main

sys.exit(main())
