"""python -m gateway: run one Gateway Server."""

import sys

from gateway.app import main

sys.exit(main())
