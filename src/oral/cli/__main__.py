import sys

from oral.cli import main

sys.exit(main())
