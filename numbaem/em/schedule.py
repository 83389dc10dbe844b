"""Schedules of frequency marching and stochastic EM (MODEL section 7).

A schedule is a list of stages ``(lmax, iters, frac, rotations)``, written as
``"lmax=2,iters=5,frac=0.1,rotations=300;lmax=4,iters=5,..."`` or as a TOML file with
``[[stage]]`` tables; each stage starts from the previous estimate with the new
coefficients zero.
"""
import dataclasses
import math

from ..model.basis import FBBasis
from ..runtime.errors import NumbaemError


STAGE_KEYS = ("lmax", "iters", "frac", "rotations")


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of frequency marching (section 7).

    Attributes
    ----------
    lmax : int
        Angular band limit of the stage.
    iters : int
        EM iterations.
    frac : float
        Stochastic factor in (0, 1]: fraction of patches drawn per iteration.
    rotations : int
        ``K``, size of the rotation grid.
    """

    lmax: int
    iters: int
    frac: float = 1.0
    rotations: int = 300

    def to_dict(self):
        return dataclasses.asdict(self)


_KINDS = dict(lmax="a whole number >= 0", iters="a whole number >= 1", frac="a fraction in (0, 1]",
              rotations="a whole number >= 1")


def _number(d, key, where, whole):
    """``d[key]`` as an int (``whole``) or float, or one sentence naming the key and value."""
    raw = d[key]
    try:
        val = float(raw)
        if not math.isfinite(val) or (whole and val != int(val)):
            raise ValueError
    except (TypeError, ValueError):
        raise NumbaemError(f"schedule {where}: {key}={raw!r} is not {_KINDS[key]}; write stages like "
                           "'lmax=4,iters=5,frac=0.1,rotations=300'") from None
    return int(val) if whole else val


def _stage_from_mapping(d, where):
    unknown = set(d) - set(STAGE_KEYS)
    if unknown:
        raise NumbaemError(f"schedule {where} has unknown key(s) {', '.join(sorted(unknown))}; "
                           f"the keys are {', '.join(STAGE_KEYS)}")
    vals = {k: _number(d, k, where, k != "frac") for k in STAGE_KEYS if k in d}
    if "lmax" not in vals or "iters" not in vals:
        raise NumbaemError(f"schedule {where} needs at least lmax and iters, e.g. 'lmax=4,iters=5,frac=0.1,rotations=300'")
    lmax, iters = vals["lmax"], vals["iters"]
    frac, K = vals.get("frac", 1.0), vals.get("rotations", 300)
    for key, val, ok in (("lmax", lmax, lmax >= 0), ("iters", iters, iters >= 1), ("frac", frac, 0 < frac <= 1),
                         ("rotations", K, K >= 1)):
        if not ok:
            raise NumbaemError(f"schedule {where}: {key}={val} must be {_KINDS[key]}")
    return Stage(lmax, iters, frac, K)


def parse_schedule(text):
    """Parse ``"lmax=2,iters=5,frac=0.1,rotations=300;lmax=4,iters=5,..."`` into stages."""
    stages = []
    parts = [p for p in str(text).split(";") if p.strip()]
    if not parts:
        raise NumbaemError("the schedule is empty; give stages like 'lmax=2,iters=5,frac=0.1,rotations=300'")
    for i, part in enumerate(parts):
        d = {}
        for item in part.split(","):
            if not item.strip():
                continue
            if "=" not in item:
                raise NumbaemError(f"schedule stage {i + 1}: '{item.strip()}' is not key=value; "
                                   "write stages like 'lmax=2,iters=5,frac=0.1,rotations=300'")
            k, v = item.split("=", 1)
            d[k.strip()] = v.strip()
        stages.append(_stage_from_mapping(d, f"stage {i + 1}"))
    return stages


def load_schedule(path):
    """Read a schedule from a TOML file with a ``[[stage]]`` array of tables."""
    import tomllib

    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except OSError as exc:
        raise NumbaemError(f"cannot read schedule file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise NumbaemError(f"schedule file {path} is not valid TOML ({exc}); see the README for the format") from None
    stages = doc.get("stage")
    if not isinstance(stages, list) or not stages:
        raise NumbaemError(f"schedule file {path} has no [[stage]] tables; see the README for the format")
    return [_stage_from_mapping(s, f"stage {i + 1} of {path}") for i, s in enumerate(stages)]


def default_schedule(L):
    """The documented default: three stages marching to the highest ``lmax`` the patch size allows.

    ``lmax`` at about a third, two thirds and all of the top order; ``K`` = 100, 300,
    1000; 4, 4 and 6 full-batch iterations. Large data sets should pass ``frac < 1``.
    """
    top = FBBasis.max_lmax(L)
    l1, l2 = max(1, round(top / 3)), max(1, round(2 * top / 3))
    return [Stage(l1, 4, 1.0, 100), Stage(l2, 4, 1.0, 300), Stage(top, 6, 1.0, 1000)]


def validate_schedule(stages, L):
    top = FBBasis.max_lmax(L)
    for i, st in enumerate(stages):
        if st.lmax > top:
            raise NumbaemError(f"schedule stage {i + 1}: lmax={st.lmax} is above the highest order {top} that "
                               f"patches of side L={L} resolve; use lmax <= {top}")
    return stages
