"""python -m channel_server: run one Channel Server."""

import sys

from channel_server.app import main

sys.exit(main())
