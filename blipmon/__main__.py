import sys

from blipmon.cli import main

sys.exit(main())
