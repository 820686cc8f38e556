"""`python -m p2pfl` is the `p2pfl` command."""

import sys

from p2pfl.app.entry import main

sys.exit(main())
