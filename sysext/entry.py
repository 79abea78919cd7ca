"""PyInstaller entry script: the frozen multi-call executable.

multicall.py uses package-relative imports, so it cannot be the script itself;
this shim imports it as part of the `overlaybd` package.
"""

import sys

from overlaybd.cli.multicall import main

if __name__ == "__main__":
    sys.exit(main())
