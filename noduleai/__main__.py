import sys

from noduleai.cli import main

sys.exit(main())
