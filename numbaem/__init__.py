"""numbaem: cryo-EM structure recovery directly from micrographs by approximate EM.

The public names are re-exported here; importing does nothing else (no logging
set-up, no numba configuration). "Theory section N" in the docstrings refers to section N
of the project's ``docs/theory.md`` (the model, the algorithm and their derivations).
"""
from ._version import __version__
from .analysis.align import VolumeAlignment, align_volumes
from .analysis.fsc import fsc, relative_error, resolution
from .data.io import read_image, read_volume, write_image, write_volume
from .data.patches import PatchSource
from .em.estep import SufficientStats, e_step_chunk, projection_spectra
from .em.mstep import normal_equations, solve
from .em.run import Reconstruction, reconstruct
from .em.schedule import Stage, default_schedule, parse_schedule
from .model.basis import FBBasis, expand, synthesize
from .model.projection import project, projection_matrices
from .model.rotations import random_rotations, rotation_grid, wigner_D
from .runtime.errors import InterruptedRun, NumbaemError
from .runtime.threads import use_threads
from .sim.molecule import synthetic_molecule


__all__ = [
    "__version__", "FBBasis", "expand", "synthesize", "Reconstruction", "Stage", "default_schedule", "parse_schedule", "reconstruct",
    "InterruptedRun", "NumbaemError", "SufficientStats", "e_step_chunk", "projection_spectra", "fsc",
    "relative_error", "resolution", "read_image", "read_volume", "write_image", "write_volume",
    "synthetic_molecule", "normal_equations", "solve", "PatchSource", "project", "projection_matrices",
    "random_rotations", "rotation_grid", "wigner_D", "use_threads", "align_volumes", "VolumeAlignment",
]
