"""`python -m flywheel`: the same as the `flywheel` command."""

import sys

from flywheel.commands import main

sys.exit(main())
