"""Entry point for ``Slicer --no-main-window --python-script batch_detect.py -- --input DIR --output DIR``."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from NoduleDetectLib.batch import main  # noqa: E402

code = main(sys.argv[1:])
try:
    import slicer

    slicer.util.exit(code)
except (ImportError, AttributeError):  # plain Python
    sys.exit(code)
