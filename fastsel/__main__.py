import sys

from fastsel.cli import main

sys.exit(main())
