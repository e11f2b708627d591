import sys

from guardray.cli import main

sys.exit(main())
