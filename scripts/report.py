"""Same as the `kdpipe-report` command: `python scripts/report.py EXPERIMENT [--sweep TAG]`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kdpipe.report.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
