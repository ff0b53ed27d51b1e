"""python -m presence: run one Presence Server."""

import sys

from presence.app import main

sys.exit(main())
