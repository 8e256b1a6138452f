"""`python -m orchestrator.cli ...`, as `cxr ...` (the tests run the subcommands this way)."""

import sys

from orchestrator.cli import main

sys.exit(main())
