"""python -m admin_server: run one Admin Server."""

import sys

from admin_server.app import main

sys.exit(main())
