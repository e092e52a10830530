import sys

from pefomed.cli import main

sys.exit(main())
