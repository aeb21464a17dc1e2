import sys

from fastsel.cli.app import main

sys.exit(main())
