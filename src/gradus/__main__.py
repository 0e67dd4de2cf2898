"""`python -m gradus ...` is the `gradus` command."""

import sys

from gradus.cli import main

sys.exit(main())
