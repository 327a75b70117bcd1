import sys

from dasslab.cli import main

sys.exit(main())
