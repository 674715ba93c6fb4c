"""``python -m convert_weights HF_DIR OUT_DIR ...``"""

import sys

from convert_weights.cli import main

if __name__ == "__main__":
    sys.exit(main())
