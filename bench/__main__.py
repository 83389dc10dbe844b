"""``python -m bench``: see :mod:`bench.main`."""
import sys

from numbaem.threads import prefer_passive_openmp

prefer_passive_openmp()  # as the command line does, before any kernel starts OpenMP

from .main import main  # noqa: E402

sys.exit(main())
