"""Entry point inside the guest: ``python3 run.py OUTDIR`` (see guestlab.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.dont_write_bytecode = True  # the share is the host's directory

import guestlab  # noqa: E402

sys.exit(guestlab.main(sys.argv[1:]))
