"""Batch detection: ``Slicer --no-main-window --python-script <path>/batch_detect.py -- --input DIR --output OUT``.

A resource of NoduleDetect, not a module: Slicer registers every top-level ``.py`` of a scripted-module
folder as a module at start-up, so this file lives in ``Scripts/``. Slicer does not exit when a
``--python-script`` ends or raises, so every path below ends it with an exit status: 0 all cases done,
1 some case failed (listed in OUT/summary.json), 2 bad arguments / missing model / unwritable output,
3 NoduleAI or a package it needs cannot be imported.
"""

import os
import sys
import traceback

EXIT_IMPORT = 3


def _exit(code: int) -> None:
    """End Slicer with ``code`` (``slicer.util.exit``); under plain Python (slicer-core), ``sys.exit``."""
    try:
        import slicer

        slicer.app  # noqa: B018 - only the Slicer application has it
    except (ImportError, AttributeError):
        sys.exit(code)
    slicer.util.exit(code)


def _run(argv: list) -> int:
    # NoduleDetectLib sits beside this folder's parent: NoduleDetect/ in a checkout, qt-scripted-modules/
    # in the installed extension (where the engine package noduleai/ is too).
    module_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if module_dir not in sys.path:
        sys.path.insert(0, module_dir)
    try:
        from NoduleDetectLib.batch import main
    except Exception as err:  # the engine, torch or another dependency is missing or broken
        traceback.print_exc()
        print(f"batch_detect: cannot import NoduleAI ({type(err).__name__}: {err}); install the extension's "
              "dependencies (open NoduleDetect once in Slicer) and try again", file=sys.stderr)
        return EXIT_IMPORT
    try:
        return main(argv)
    except SystemExit as stop:  # argparse: --help (0) or a usage error (2)
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 2)
    except BaseException:
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    _exit(_run(sys.argv[1:]))
