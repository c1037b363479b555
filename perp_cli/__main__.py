import sys

from perp_cli.cli.app import main

sys.exit(main())
