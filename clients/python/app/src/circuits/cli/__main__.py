import sys

from circuits.cli import main

sys.exit(main())
