"""python -m webapp_stub: run the webapp (same as ``rtm webapp``)."""

import sys

from webapp_stub.app import main

sys.exit(main())
