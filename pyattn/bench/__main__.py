"""``python -m pyattn.bench``: the same command as ``pyattn-bench``."""

from pyattn.bench.cli import main

raise SystemExit(main())
