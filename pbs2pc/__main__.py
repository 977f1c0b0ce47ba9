import sys

from pbs2pc.cli import main

sys.exit(main())
