"""`python -m nllflow ...`: the `nllflow` command."""

import sys

from nllflow.flows.cli import main

sys.exit(main())
