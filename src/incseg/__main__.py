import sys

from incseg.cli import main

sys.exit(main())
