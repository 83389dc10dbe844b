"""Checkpoints that let a long run survive being stopped, killed or preempted.

A run is continued from its last *finished* iteration and gives the same bits as a run
that was never stopped (same machine, any thread count): everything the iterations
read is in the checkpoint, namely ``theta``, ``lmax``, ``upsilon``, ``sigma^2``, the
schedule position and the exact state of the random generator that draws the
minibatches.

Files in the checkpoint directory
---------------------------------
``state-NNNNNN.npz``
    ``theta`` (float64) of iteration ``NNNNNN``, written with :func:`numpy.savez` and
    read with ``allow_pickle=False``: nothing in a checkpoint is pickled.
``state.json``
    The scalars, the generator state, the history of iteration records, the inputs of
    the run with their hash, the package version, the name of the ``.npz`` and its
    sha256.
``lock``
    Held (``flock``) by the process that writes the directory, so two runs never
    write one checkpoint; the kernel releases it when the process dies.

Every file is written atomically (:func:`numbaem.data.io.atomic_path`: temporary file in the
same directory, flush, ``fsync``, :func:`os.replace`, ``fsync`` of the directory). The
``.npz`` is written first, then the ``state.json`` that names it, and only then are
older ``.npz`` files removed, so at every instant ``state.json`` points at a complete
``.npz``; a process killed at any point leaves either the previous checkpoint or the
new one, never a mixture. The sha256 in ``state.json`` catches a pair torn by other
means (a file copied or restored alone, disk damage).

Which run a checkpoint belongs to
---------------------------------
:func:`run_hash` is the sha256 of a canonical JSON of the inputs that determine the
result (:func:`run_inputs` builds them: micrograph contents, ``L``, ``sigma^2``, noise
estimation, schedule, seed, Tikhonov ``lambda``, ``upsilon_0``, the initial volume, the
memory budget, which fixes the chunk size and with it the order of the sums, and the
FFTW planner effort; not the thread count, which changes no bit). :meth:`Checkpointer.load` refuses a
checkpoint made with other inputs and names each input that differs.

Stopping between iterations
---------------------------
:class:`numbaem.cli.signals.GracefulStop` (the command line) turns the first SIGINT or SIGTERM into a request that
:func:`numbaem.em.run.reconstruct` polls between iterations (``should_stop``); the run
then ends with only finished iterations, all already checkpointed. A second signal
raises :class:`KeyboardInterrupt` at once; the checkpoint on disk still holds the last
finished iteration.
"""
import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import re
from pathlib import Path

import numpy as np

from ..runtime.errors import NumbaemError
from ..data.io import atomic_write_bytes, atomic_write_text

try:  # POSIX; elsewhere the directory is not locked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

logger = logging.getLogger(__name__)

__all__ = [
    "FORMAT",
    "run_hash",
    "run_inputs",
    "file_fingerprint",
    "array_fingerprint",
    "Checkpointer",
]

#: Version of the checkpoint layout; a reader refuses a newer one.
FORMAT = 1

#: Inputs that a resuming run may leave out (the checkpoint's value is then taken):
#: the initial volume is not read again when a run continues.
OPTIONAL_ON_RESUME = ("init",)

_STATE = "state.json"
_LOCK = "lock"
_NPZ_RE = re.compile(r"state-(\d{6,})\.npz")
_BIT_GENERATORS = ("PCG64", "PCG64DXSM")   # states made of integers only, hence JSON-able
_SAMPLE_BLOCKS = 32
_SAMPLE_BYTES = 1 << 16


# --------------------------------------------------------------------------- inputs and their hash


def _canonical(obj, where="inputs"):
    """``obj`` as plain JSON types: dicts with str keys, lists, str, int, float, bool, None.

    numpy scalars become Python numbers, tuples lists, paths strings, dataclasses
    (a :class:`numbaem.em.run.Stage`) dicts, and arrays their :func:`array_fingerprint`.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        val = float(obj)
        if not math.isfinite(val):
            raise NumbaemError(f"{where} is {val}, which a checkpoint cannot record; give a finite number")
        return val
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, np.ndarray):
        return array_fingerprint(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        to_dict = getattr(obj, "to_dict", None)   # a Stage names only the keys it uses
        return _canonical(to_dict() if to_dict is not None else dataclasses.asdict(obj), where)
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise NumbaemError(f"{where} has the key {k!r}, not a string; name every input with a string")
            out[k] = _canonical(v, f"{where}[{k!r}]")
        return out
    if isinstance(obj, (list, tuple)):
        return [_canonical(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    raise NumbaemError(f"{where} is a {type(obj).__name__}, which a checkpoint cannot record; "
                       "pass numbers, strings, lists, dicts or arrays")


def _canonical_json(obj):
    return json.dumps(_canonical(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False)


def run_hash(inputs):
    """sha256 (hex) of the canonical JSON of a run's inputs.

    Canonical: keys sorted, no white space, numbers as Python writes them (floats by
    their shortest round-trip ``repr``), numpy scalars as Python numbers, arrays by
    their :func:`array_fingerprint`. Dict order does not matter; ``1`` and ``1.0``
    differ (:func:`run_inputs` fixes the types).

    Parameters
    ----------
    inputs : dict
        The inputs that determine the result (see :func:`run_inputs`).

    Returns
    -------
    str
        64 hex digits.
    """
    if not isinstance(inputs, dict):
        raise NumbaemError(f"inputs is a {type(inputs).__name__}; pass a dict of the run's options")
    return hashlib.sha256(_canonical_json(inputs).encode("ascii")).hexdigest()


def array_fingerprint(a):
    """``{"shape", "dtype", "sha256"}`` of an array's C-ordered bytes."""
    a = np.ascontiguousarray(a)
    if a.dtype.hasobject:
        raise NumbaemError("an array of Python objects cannot be fingerprinted; pass numbers")
    return {"shape": [int(n) for n in a.shape], "dtype": a.dtype.str, "sha256": hashlib.sha256(a.tobytes()).hexdigest()}


def file_fingerprint(path, blocks=_SAMPLE_BLOCKS, block_bytes=_SAMPLE_BYTES):
    """Identify a (micrograph) file by its name, size and a hash of sampled contents.

    The hash covers the whole file when it is at most ``blocks * block_bytes`` bytes
    (2 MiB by default), otherwise the first block (the MRC header and the first rows)
    and ``blocks - 1`` more spread evenly up to the end. The modification time is left
    out on purpose: copying the data to a scratch disk changes it but not the result.

    Parameters
    ----------
    path : str or os.PathLike

    Returns
    -------
    dict
        ``{"name": base name, "bytes": size, "sample_sha256": hex digest}``.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            if size <= blocks * block_bytes:
                h.update(fh.read())
            else:
                last = size - block_bytes
                for i in range(blocks):
                    fh.seek(i * last // (blocks - 1))
                    h.update(fh.read(block_bytes))
    except OSError as exc:
        raise NumbaemError(f"cannot read {str(p)!r} to fingerprint it for the checkpoint: "
                           f"{exc.strerror or exc}; check the path") from None
    return {"name": p.name, "bytes": int(size), "sample_sha256": h.hexdigest()}


def run_inputs(micrographs, *, L, sigma2, estimate_noise, schedule, seed, tikhonov, upsilon0, init,
               memory):
    """The inputs that determine a reconstruction's result, ready for :func:`run_hash`.

    Parameters
    ----------
    micrographs : list of paths
        Fingerprinted by content (:func:`file_fingerprint`), in order (the order fixes
        the patch indices that the minibatches draw).
    L : int
    sigma2 : float or None
        The noise variance given to :func:`numbaem.em.run.reconstruct` (the starting value
        with ``estimate_noise``; None: estimated from the data, deterministically).
    estimate_noise : bool
    schedule : list of Stage or None
        ``None`` is the default schedule, recorded as its stages for ``L``.
    seed : int or None
    tikhonov, upsilon0 : float
    init : ndarray (L, L, L), 'random' or None
        The initial volume as passed to ``reconstruct`` (after any downsampling);
        ``None`` when resuming without it (the checkpoint's record is then used).
    memory : int or None
        The budget in bytes (``None``: :func:`numbaem.runtime.memory.default_budget`, resolved
        here because it sets the chunk size and so the order of the sums).

    The thread count is not an input: every kernel splits its work by patch or by
    rotation, never by thread, so 1 and N threads give the same bits (tested), and a run
    checkpointed on 8 threads continues on 2.

    Returns
    -------
    dict
    """
    from .schedule import default_schedule
    from ..runtime.fft import planner_effort
    from ..runtime.memory import default_budget

    inputs = dict(
        micrographs=[file_fingerprint(m) for m in micrographs],
        L=int(L),
        sigma2=None if sigma2 is None else float(sigma2),
        estimate_noise=bool(estimate_noise),
        schedule=[_canonical(s) for s in (schedule if schedule else default_schedule(int(L)))],
        seed=None if seed is None else int(seed),
        tikhonov=float(tikhonov),
        upsilon0=float(upsilon0),
        memory=int(default_budget() if memory is None else memory),
        fftw_effort=planner_effort(),
    )
    if init is not None:
        if isinstance(init, str):
            inputs["init"] = init
        else:
            inputs["init"] = array_fingerprint(np.asarray(init, dtype=np.float64))
    return inputs


def _short(value, limit=160):
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _differences(old, new):
    """``key=old (this run: key=new)`` for every top-level key that differs."""
    out = []
    for k in sorted(set(old) | set(new)):
        if k not in new:
            out.append(f"{k}={_short(old[k])} (this run: no {k})")
        elif k not in old:
            out.append(f"no {k} (this run: {k}={_short(new[k])})")
        elif _canonical_json(old[k]) != _canonical_json(new[k]):
            out.append(f"{k}={_short(old[k])} (this run: {k}={_short(new[k])})")
    return out


# --------------------------------------------------------------------------- the checkpointer


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON-able")


class Checkpointer:
    """Writes a run's state after every iteration and reads it back to continue.

    Parameters
    ----------
    directory : str or os.PathLike
        The checkpoint directory (created with its parents on the first write).
    inputs : dict
        The inputs that determine the result (:func:`run_inputs`); stored with their
        :func:`run_hash`, which a continuing run must reproduce.
    force : bool
        Let a fresh run replace a checkpoint that is already in ``directory``.

    Examples
    --------
    >>> with Checkpointer("run1.ckpt", inputs) as ckpt:            # doctest: +SKIP
    ...     state = ckpt.begin(resume=True)   # None: nothing to continue
    ...     state = reconstruct(source, init, ..., state=state, callback=ckpt.save)

    Notes
    -----
    The object locks the directory (``flock`` on ``lock``) the first time it reads or
    writes it, and holds the lock until :meth:`close` (or the end of the ``with``
    block, or the process): a second run on the same directory is refused.
    """

    def __init__(self, directory, inputs, force=False):
        if not isinstance(directory, (str, os.PathLike)) or str(directory) == "":
            raise NumbaemError(f"checkpoint directory {directory!r} is not a path; pass a directory name")
        self.directory = Path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise NumbaemError(f"checkpoint directory {str(self.directory)!r} is a file; "
                               "give the name of a directory (it is created if missing)")
        if not isinstance(inputs, dict):
            raise NumbaemError(f"inputs is a {type(inputs).__name__}; pass a dict of the run's options")
        self.inputs = _canonical(inputs)
        self.force = bool(force)
        self._lock_file = None
        self._owned = False          # fresh-run check done, or the checkpoint was loaded
        self.saves = 0

    # -- paths and locking

    @property
    def state_path(self):
        return self.directory / _STATE

    @property
    def hash(self):
        """:func:`run_hash` of this run's inputs."""
        return run_hash(self.inputs)

    def exists(self):
        """Whether the directory holds a ``state.json``."""
        return self.state_path.is_file()

    def _lock(self):
        if self._lock_file is not None:
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise NumbaemError(f"cannot create the checkpoint directory {str(self.directory)!r}: "
                               f"{exc.strerror or exc}; check the path and permissions") from None
        if fcntl is None:  # pragma: no cover
            self._lock_file = False
            return
        path = self.directory / _LOCK
        fh = open(path, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip()
            fh.close()
            raise NumbaemError(f"checkpoint directory {str(self.directory)!r} is in use by another numbaem run"
                               + (f" (process {holder})" if holder else "")
                               + "; wait for it to end or stop it, or choose another checkpoint directory") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self._lock_file = fh
        self._remove_temporaries()

    def close(self):
        """Release the directory's lock."""
        if self._lock_file:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_UN)
            self._lock_file.close()
        self._lock_file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def _remove_temporaries(self):
        """Temporary files of writes that a killed process left (we hold the lock)."""
        for p in self.directory.glob(".state*"):
            with contextlib.suppress(OSError):
                p.unlink()
                logger.debug("removed leftover temporary file %s", p)

    def _npz_files(self):
        return sorted(p for p in self.directory.glob("state-*.npz") if _NPZ_RE.fullmatch(p.name))

    def _describe_existing(self):
        try:
            doc = json.loads(self.state_path.read_text(encoding="utf-8"))
            return f" (iteration {int(doc['total_iterations'])}, stage {int(doc['stage']) + 1})"
        except (OSError, ValueError, KeyError, TypeError):
            return ""

    def _clear(self):
        """Remove this directory's checkpoint files: ``state.json`` first, so none names a missing ``.npz``."""
        with contextlib.suppress(FileNotFoundError):
            self.state_path.unlink()
        for p in self._npz_files():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    def _claim_fresh(self):
        """Make the directory ours for a fresh run: refuse an existing checkpoint unless ``force``."""
        self._lock()
        if self.exists():
            if not self.force:
                raise NumbaemError(
                    f"checkpoint directory {str(self.directory)!r} already holds a checkpoint"
                    f"{self._describe_existing()}; pass --resume to continue it, --force to start over "
                    "and replace it, or choose another checkpoint directory")
            logger.warning("replacing the checkpoint in %s%s (force)", self.directory, self._describe_existing())
        self._clear()        # also .npz files a killed first write left without a state.json
        self._owned = True

    # -- the two entry points

    def begin(self, resume=False):
        """Prepare the directory before the first iteration.

        Parameters
        ----------
        resume : bool
            Continue the checkpoint in the directory if there is one (returns its
            state; ``None`` when the directory holds none, so the run starts
            afresh). Without ``resume`` an existing checkpoint is refused, unless
            ``force`` was given, in which case it is removed.

        Returns
        -------
        EMState or None
        """
        if resume:
            state = self.load()
            if state is None:
                logger.info("no checkpoint in %s yet; starting the run from the beginning", self.directory)
            return state
        self._claim_fresh()
        return None

    def save(self, state, record=None):
        """Write ``state`` as the directory's checkpoint (the ``callback`` of ``reconstruct``).

        Parameters
        ----------
        state : numbaem.em.run.EMState
            With a ``numpy.random.Generator`` on a PCG64 bit generator.
        record : dict, optional
            The iteration's record (already in ``state.history``; unused).
        """
        if not self._owned:
            self._claim_fresh()
        self._lock()
        theta = np.ascontiguousarray(state.theta, dtype=np.float64)
        if theta.ndim != 1 or not np.all(np.isfinite(theta)):
            raise NumbaemError(f"state.theta has shape {theta.shape} or non-finite values; a checkpoint "
                               "holds a finite 1-D coefficient vector")
        rng_state = _rng_state(state.rng)
        buf = io.BytesIO()
        np.savez(buf, theta=theta)
        data = buf.getvalue()
        name = f"state-{int(state.total_iterations):06d}.npz"
        doc = dict(
            format=FORMAT,
            version=_version(),
            hash=self.hash,
            inputs=self.inputs,
            npz=name,
            npz_sha256=hashlib.sha256(data).hexdigest(),
            M=int(theta.size),
            lmax=int(state.lmax),
            upsilon=float(state.upsilon),
            sigma2=float(state.sigma2),
            stage=int(state.stage),
            iteration=int(state.iteration),
            total_iterations=int(state.total_iterations),
            rng=rng_state,
            history=list(state.history),
        )
        # the extensions' parameters (theory section 14), only when switched on: JSON floats
        # round-trip exactly (repr), so a resumed run continues with the same bits
        if state.view_weights is not None:
            doc["view_weights"] = [float(x) for x in state.view_weights]
            doc["view_floor"] = float(state.view_floor)
            # None: every grid (an infinite ratio; JSON has no infinity)
            doc["view_grid_ratio"] = float(state.view_grid_ratio) if math.isfinite(state.view_grid_ratio) else None
            if state.view_fixed:
                doc["view_fixed"] = True
        if state.junk_theta is not None:
            doc["junk_theta"] = [float(x) for x in state.junk_theta]
            doc["varsigma"] = float(state.varsigma)
        if state.junk_lam is not None:
            doc["junk_lam"] = [float(x) for x in state.junk_lam]
            doc["varsigma"] = float(state.varsigma)
        text = json.dumps(doc, indent=1, default=_json_default) + "\n"
        atomic_write_bytes(self.directory / name, data, force=True)
        atomic_write_text(self.state_path, text, force=True)
        for p in self._npz_files():
            if p.name != name:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
        self.saves += 1
        logger.debug("checkpoint of iteration %d written to %s", state.total_iterations, self.directory)

    def load(self):
        """The state of the checkpoint in the directory, or ``None`` if there is none.

        Returns
        -------
        EMState or None
            With ``rng`` a generator in exactly the saved state, so the minibatch
            draws continue the same stream.

        Raises
        ------
        NumbaemError
            If the checkpoint was made with other inputs (the message names each
            input that differs), or a file is missing, unreadable, damaged, or the
            ``.npz`` does not match the sha256 that ``state.json`` records.
        """
        from .run import EMState

        if not self.directory.is_dir():
            self._owned = True
            return None
        self._lock()
        self._owned = True
        path = self.state_path
        if not path.is_file():
            return None
        where = f"checkpoint {str(path)!r}"
        fix = f"delete {str(self.directory)!r} (or pass --force without --resume) to start over"
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise NumbaemError(f"{where} cannot be read ({exc}); it is damaged: {fix}") from None
        if not isinstance(doc, dict):
            raise NumbaemError(f"{where} is not a numbaem checkpoint (no JSON object); {fix}")
        fmt = doc.get("format")
        if not isinstance(fmt, int) or fmt > FORMAT:
            raise NumbaemError(f"{where} has format {fmt!r}, which this numbaem ({_version()}) does not know "
                               f"(it reads format {FORMAT}); continue it with the numbaem version that wrote it")
        try:
            stored, stored_hash = doc["inputs"], doc["hash"]
            npz_name, npz_sha = str(doc["npz"]), str(doc["npz_sha256"])
            lmax, M = _int(doc["lmax"]), _int(doc["M"])
            stage, iteration, total = _int(doc["stage"]), _int(doc["iteration"]), _int(doc["total_iterations"])
            upsilon, sigma2 = _float(doc["upsilon"]), _float(doc["sigma2"])
            rng_doc, history = doc["rng"], doc["history"]
            if not isinstance(stored, dict) or not isinstance(history, list) or not isinstance(rng_doc, dict):
                raise TypeError
        except (KeyError, TypeError, ValueError) as exc:
            raise NumbaemError(f"{where} lacks a field or has one of the wrong type ({exc!r}); it is damaged "
                               f"or not a numbaem checkpoint: {fix}") from None
        if run_hash(stored) != stored_hash:
            raise NumbaemError(f"{where} records inputs that do not match its own hash: it was edited or "
                               f"damaged; {fix}")
        current = dict(self.inputs)
        for k in OPTIONAL_ON_RESUME:
            if k not in current and k in stored:
                current[k] = stored[k]
        if run_hash(current) != stored_hash:
            diffs = _differences(stored, current)
            raise NumbaemError(f"the checkpoint in {str(self.directory)!r} belongs to another run: it was made with "
                               + "; ".join(diffs)
                               + ". Use another --checkpoint directory, or the options of that run to continue it")
        version = doc.get("version")
        if version != _version():
            logger.warning("the checkpoint in %s was written by numbaem %s, this is %s; the continued run "
                           "may differ in round-off from an uninterrupted one", self.directory, version, _version())
        if not _NPZ_RE.fullmatch(npz_name):
            raise NumbaemError(f"{where} names the array file {npz_name!r}, not a state-NNNNNN.npz; {fix}")
        npz_path = self.directory / npz_name
        try:
            data = npz_path.read_bytes()
        except FileNotFoundError:
            raise NumbaemError(f"{where} names {npz_name}, which is missing from {str(self.directory)!r}; the "
                               f"checkpoint is incomplete: {fix}") from None
        except OSError as exc:
            raise NumbaemError(f"cannot read {str(npz_path)!r}: {exc.strerror or exc}") from None
        if hashlib.sha256(data).hexdigest() != npz_sha:
            raise NumbaemError(f"{str(npz_path)!r} does not match the sha256 recorded in {_STATE}: the pair is torn "
                               f"or the file is damaged; {fix}")
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                if set(z.files) != {"theta"}:
                    raise ValueError(f"it holds {sorted(z.files)}, not just theta")
                theta = z["theta"]
        except (ValueError, OSError, EOFError) as exc:
            raise NumbaemError(f"{str(npz_path)!r} is not a readable checkpoint array ({exc}); {fix}") from None
        if theta.dtype != np.float64 or theta.ndim != 1 or theta.size != M or not np.all(np.isfinite(theta)):
            raise NumbaemError(f"{str(npz_path)!r} holds theta of shape {theta.shape} and dtype {theta.dtype}, not "
                               f"{M} finite float64 coefficients; {fix}")
        if "L" in stored:
            from ..model.basis import FBBasis
            expected = FBBasis(int(stored["L"]), lmax).M
            if M != expected:
                raise NumbaemError(f"{where} has {M} coefficients, but lmax={lmax} at L={stored['L']} has "
                                   f"{expected}; {fix}")
        rng = _restore_rng(rng_doc, where, fix)
        self.inputs = current
        logger.info("loaded the checkpoint of iteration %d (stage %d, iteration %d in it) from %s",
                    total, stage + 1, iteration, self.directory)
        state = EMState(theta=theta, lmax=lmax, upsilon=upsilon, sigma2=sigma2, stage=stage,
                        iteration=iteration, total_iterations=total, rng=rng, history=history)
        try:
            if "view_weights" in doc:
                state.view_weights = np.array([_float(x) for x in doc["view_weights"]], dtype=np.float64)
                state.view_floor = _float(doc["view_floor"])
                # absent in checkpoints written before the rule: those runs updated the prior on every grid
                ratio = doc.get("view_grid_ratio")
                state.view_grid_ratio = math.inf if ratio is None else _float(ratio)
                state.view_fixed = bool(doc.get("view_fixed", False))
            if "junk_theta" in doc:
                state.junk_theta = np.array([_float(x) for x in doc["junk_theta"]], dtype=np.float64)
                state.varsigma = _float(doc["varsigma"])
            if "junk_lam" in doc:
                state.junk_lam = np.array([_float(x) for x in doc["junk_lam"]], dtype=np.float64)
                state.varsigma = _float(doc["varsigma"])
        except (KeyError, TypeError, ValueError) as exc:
            raise NumbaemError(f"{where} has a damaged orientation prior or junk class ({exc!r}); {fix}") from None
        return state


def _int(v):
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{v!r} is not an integer")
    return v


def _float(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{v!r} is not a number")
    return float(v)


def _version():
    from .._version import __version__
    return __version__


def _rng_state(rng):
    if not isinstance(rng, np.random.Generator):
        raise NumbaemError(f"state.rng is a {type(rng).__name__}; checkpointing needs a numpy.random.Generator "
                           "(numpy.random.default_rng(seed))")
    st = rng.bit_generator.state
    name = st.get("bit_generator")
    if name not in _BIT_GENERATORS:
        raise NumbaemError(f"the random generator uses {name}; checkpointing supports {', '.join(_BIT_GENERATORS)} "
                           "(numpy.random.default_rng(seed) is PCG64)")
    return _canonical(st, "rng state")


def _restore_rng(doc, where, fix):
    name = doc.get("bit_generator")
    if name not in _BIT_GENERATORS:
        raise NumbaemError(f"{where} records a random generator {name!r}, not one of "
                           f"{', '.join(_BIT_GENERATORS)}; {fix}")
    rng = np.random.default_rng()
    if type(rng.bit_generator).__name__ != name:
        rng = np.random.Generator(getattr(np.random, name)())
    try:
        rng.bit_generator.state = doc
    except (TypeError, ValueError, KeyError, OverflowError) as exc:
        raise NumbaemError(f"{where} has a random generator state that {name} refuses ({exc}); {fix}") from None
    if rng.bit_generator.state != doc:
        raise NumbaemError(f"{where} has a random generator state that does not restore exactly; {fix}")
    return rng


