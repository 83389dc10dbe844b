"""Schedules of frequency marching and stochastic EM (theory section 7).

A schedule is a list of stages, written as ``"lmax=2,iters=5,frac=0.1,rotations=300;
lmax=4,iters=5,..."`` or as a TOML file with ``[[stage]]`` tables; each stage starts from
the previous estimate with the new coefficients zero.

The rotation search of a stage is either exhaustive on ``rotations`` near-uniform
(super-Fibonacci) rotations, or, with ``fine`` (an angular step in degrees), the
coarse-to-fine search of :mod:`numbaem.em.search` on the hierarchical Hopf grid: every
patch scored at the ``coarse`` step, refined while its posterior is concentrated down to
the ``fine`` step, losing at most ``prune`` of its posterior mass; ``local`` (degrees)
scores a patch seen before only near the rotations its posterior held last time.
"""
import dataclasses
import math

from ..model.basis import FBBasis
from ..runtime.errors import NumbaemError


STAGE_KEYS = ("lmax", "iters", "frac", "rotations", "fine", "coarse", "prune", "local", "cap", "margin", "bound")

#: The coarse step (degrees) of a search stage that names none: Hopf level 1, 576 rotations.
DEFAULT_COARSE_STEP = 30.0


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
        ``K``, size of the rotation grid of an exhaustive search (unused with ``fine``).
    fine : float, optional
        Finest angular step in degrees of a coarse-to-fine search on the Hopf grid (the
        level whose step is at most this: 60 / 2^r degrees); None: exhaustive search.
    coarse : float, optional
        The search's coarse step in degrees (default :data:`DEFAULT_COARSE_STEP`, or
        one level above ``fine`` when that is coarser).
    prune : float
        Posterior mass a patch may lose to pruning, in [0, 1).
    local : float
        Local search radius in degrees (0: none).
    cap : int
        A patch is refined while at most this many rotations hold all but its share of
        ``prune`` of its rotation mass (0: always refined).
    margin : float
        Neighbours within this many grid steps of a refined rotation are refined too.
    bound : int
        1: a refined patch also refines every cell a bound on its best score cannot rule
        out (branch and bound, theory section 12.11); 0: by the centres' masses alone.
    """

    lmax: int
    iters: int
    frac: float = 1.0
    rotations: int = 300
    fine: float = None
    coarse: float = None
    prune: float = 1e-3
    local: float = 0.0
    cap: int = 32
    margin: float = 1.5
    bound: int = 0

    def to_dict(self):
        d = dataclasses.asdict(self)
        if self.fine is None:   # exhaustive stages keep the keys they always had
            for k in ("fine", "coarse", "prune", "local", "cap", "margin", "bound"):
                d.pop(k)
        else:                   # a search has no K of its own
            d.pop("rotations")
            if self.coarse is None:
                d.pop("coarse")
            if not self.bound:  # checkpoints written before the key existed compare equal
                d.pop("bound")
        return d

    @property
    def is_search(self):
        return self.fine is not None

    def search_spec(self):
        """The :class:`numbaem.em.search.SearchSpec` of a search stage (None for an exhaustive one)."""
        if self.fine is None:
            return None
        from ..model import hopf
        from .search import SearchSpec
        rf = hopf.level_for_step(self.fine)
        rc = hopf.level_for_step(self.coarse if self.coarse is not None else DEFAULT_COARSE_STEP)
        if self.coarse is None:
            rc = min(rc, max(0, rf - 1))
        return SearchSpec(rc, rf, self.prune, cap=self.cap, margin=self.margin, local=self.local,
                          bound=bool(self.bound))

    @property
    def size(self):
        """Rotations of the statistics: ``rotations``, or every rotation of the search's levels."""
        spec = self.search_spec()
        if spec is None:
            return self.rotations
        from ..model import hopf
        return sum(hopf.size(r) for r in spec.levels)


_KINDS = dict(lmax="a whole number >= 0", iters="a whole number >= 1", frac="a fraction in (0, 1]",
              rotations="a whole number >= 1", fine="an angle in degrees > 0", coarse="an angle in degrees > 0",
              prune="a fraction in [0, 1)", local="an angle in degrees >= 0", cap="a whole number >= 1",
              margin="a number > 0", bound="0 or 1")
_WHOLE = ("lmax", "iters", "rotations", "cap", "bound")


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
    vals = {k: _number(d, k, where, k in _WHOLE) for k in STAGE_KEYS if k in d}
    if "lmax" not in vals or "iters" not in vals:
        raise NumbaemError(f"schedule {where} needs at least lmax and iters, e.g. 'lmax=4,iters=5,frac=0.1,rotations=300'")
    lmax, iters = vals["lmax"], vals["iters"]
    frac, K = vals.get("frac", 1.0), vals.get("rotations", 300)
    fine, coarse = vals.get("fine"), vals.get("coarse")
    prune, local = vals.get("prune", 1e-3), vals.get("local", 0.0)
    cap, margin = vals.get("cap", 32), vals.get("margin", 1.5)
    bound = vals.get("bound", 0)
    for key, val, ok in (("lmax", lmax, lmax >= 0), ("iters", iters, iters >= 1), ("frac", frac, 0 < frac <= 1),
                         ("rotations", K, K >= 1), ("fine", fine, fine is None or fine > 0),
                         ("coarse", coarse, coarse is None or coarse > 0), ("prune", prune, 0 <= prune < 1),
                         ("local", local, local >= 0), ("cap", cap, cap >= 1), ("margin", margin, margin > 0),
                         ("bound", bound, bound in (0, 1))):
        if not ok:
            raise NumbaemError(f"schedule {where}: {key}={val} must be {_KINDS[key]}")
    if fine is None and any(k in d for k in ("coarse", "prune", "local", "cap", "margin", "bound")):
        raise NumbaemError(f"schedule {where}: coarse, prune, local, cap, margin and bound belong to a coarse-to-fine "
                           "search; "
                           "give its finest step too, e.g. 'fine=7.5'")
    if fine is not None and "rotations" in d:
        raise NumbaemError(f"schedule {where}: give either rotations=K (exhaustive search) or fine=STEP "
                           "(coarse-to-fine search on the Hopf grid), not both")
    st = Stage(lmax, iters, frac, K, fine, coarse, prune, local, cap, margin, bound)
    try:
        st.search_spec()
    except NumbaemError as exc:
        raise NumbaemError(f"schedule {where}: {exc}") from None
    return st


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


def default_schedule(L, search=True):
    """The documented default: three stages marching to the highest ``lmax`` the patch size allows.

    ``lmax`` at about a third, two thirds and all of the top order; 4, 4 and 6 full-batch
    iterations: exhaustive on K = 100 and 300 rotations, then a coarse-to-fine search from
    60 degrees (72 rotations) down to 7.5 degrees (15 for ``L > 9``), pruning 1e-3 of each
    patch's posterior, refining within one grid step of the rotations kept and searching
    within 20 degrees of where a concentrated posterior was. On the README's default data
    (four 700 x 700 micrographs, L = 7, SNR 5, 2 threads) it took 172 s in all to an aligned
    relative error of 0.0772, against 229 s to 0.0774 with K = 1000 in the last stage
    (``bench/reference/search-default-*.json``). ``search=False`` gives that exhaustive
    variant: what runs on boxes around picks (a search does not model their shift window)
    and with the junk class (exhaustive stages only). Large data sets should pass
    ``frac < 1``.
    """
    top = FBBasis.max_lmax(L)
    l1, l2 = max(1, round(top / 3)), max(1, round(2 * top / 3))
    fine = 7.5 if L <= 9 else 15.0
    last = Stage(top, 6, 1.0, fine=fine, coarse=60.0, prune=1e-3, local=20.0, margin=1.0) if search else \
        Stage(top, 6, 1.0, 1000)
    return [Stage(l1, 4, 1.0, 100), Stage(l2, 4, 1.0, 300), last]


def schedule_or_default(schedule, L, boxes=False, junk_class=False):
    """``schedule`` if given, else :func:`default_schedule` of ``L``: with its search stage,
    except on boxes around picks (a search does not model their shift window) and with the
    junk class (exhaustive stages only), which take the exhaustive variant."""
    return schedule or default_schedule(L, search=not (boxes or junk_class))


def validate_schedule(stages, L):
    top = FBBasis.max_lmax(L)
    for i, st in enumerate(stages):
        if st.lmax > top:
            raise NumbaemError(f"schedule stage {i + 1}: lmax={st.lmax} is above the highest order {top} that "
                               f"patches of side L={L} resolve; use lmax <= {top}")
    return stages
