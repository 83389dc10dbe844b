"""Figure plumbing shared by the plotting functions: an Agg figure, an atomic PNG write.

matplotlib's object API with the Agg canvas: no display needed, and the global pyplot
backend is left alone. Files are written under a temporary name and renamed
(:func:`numbaem.data.io.atomic_path`), so a failed plot leaves nothing half-written.
"""
import logging

import numpy as np

from ..runtime.errors import NumbaemError

logger = logging.getLogger(__name__)


def new_figure(width, height, dpi=100, layout=None):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, path, force, what):
    from ..data.io import atomic_path

    with atomic_path(path, force=force) as tmp:
        fig.savefig(tmp, format="png")
    logger.info("wrote %s %s", what, path)
    return fig


def check_force(force):
    if not isinstance(force, (bool, np.bool_)):
        raise NumbaemError(f"force={force!r} is not True or False; pass force=True to overwrite an existing file")
    return bool(force)
