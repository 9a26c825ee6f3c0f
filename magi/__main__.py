import sys

from magi.cli import main

sys.exit(main())
