"""`python -m kd_plugin` runs the `kd-plugin` command line."""

import sys

from kd_plugin.cli import main

sys.exit(main())
