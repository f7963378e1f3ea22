import sys

from dsl_fed.cli import main

sys.exit(main())
