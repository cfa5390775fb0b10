import sys

from tasktrail.cli import main

sys.exit(main())
