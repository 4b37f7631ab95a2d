"""`python -m sessionledger` is the `sessionledger` command."""

import sys

from .cli import main

sys.exit(main())
