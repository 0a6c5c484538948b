import sys

from ferd.cli import main

sys.exit(main())
