import sys

from downpour.cli import main

sys.exit(main())
