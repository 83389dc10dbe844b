"""numbaem: cryo-EM structure recovery directly from micrographs by approximate EM.

The public names are re-exported here; importing does nothing else (no logging
set-up, no numba configuration).
"""
from .basis import FBBasis, expand, synthesize
from .em import Stage, default_schedule, parse_schedule, reconstruct
from .errors import InterruptedRun, NumbaemError
from .estep import SufficientStats, e_step_chunk, projection_spectra
from .fsc import fsc, relative_error, resolution
from .io import read_image, read_volume, write_image, write_volume
from .molecule import synthetic_molecule
from .mstep import normal_equations, solve
from .patches import PatchSource
from .projection import project, projection_matrices
from .rotations import random_rotations, rotation_grid, wigner_D
from .threads import use_threads

__version__ = "0.1.0"

__all__ = [
    "FBBasis", "expand", "synthesize", "Stage", "default_schedule", "parse_schedule", "reconstruct",
    "InterruptedRun", "NumbaemError", "SufficientStats", "e_step_chunk", "projection_spectra", "fsc",
    "relative_error", "resolution", "read_image", "read_volume", "write_image", "write_volume",
    "synthetic_molecule", "normal_equations", "solve", "PatchSource", "project", "projection_matrices",
    "random_rotations", "rotation_grid", "wigner_D", "use_threads",
]
