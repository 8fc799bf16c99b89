import sys

from ayf.cli import main

sys.exit(main())
