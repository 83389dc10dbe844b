"""The suites' data: micrographs made by ``numbaem simulate``, cached on disk, and the CLI run on them.

A figure the bench reports must be one a user gets, so the data are made the way a
user makes them and run the way a user runs them:

1. ``numbaem molecule`` writes the truth (a seeded synthetic molecule of side ``L0``)
   and a structural homolog of it (the start, as a user would start from a homolog or
   a predicted model);
2. ``numbaem simulate`` writes the micrographs (MRC, float32) at the requested SNR,
   with the truth volume and the simulation's JSON;
3. ``numbaem reconstruct`` runs the EM on those files (``--init`` the homolog,
   ``--downsample-init``, ``--noise-var`` the simulation's ``sigma2``, a one-stage
   ``--schedule``, ``--memory``, ``--log``); the seconds per iteration and the peak
   memory are read from its JSON-lines log.

All three run in this process through :func:`numbaem.cli.main.main`, the entry point of
the ``numbaem`` command, so the code path is the command's own.

The data are cached: :func:`prepare` writes them into ``DATA_DIR/<name>-<digest>/``
(``digest`` hashes every parameter of :class:`DataSpec`), writes ``dataset.json``
last, and reuses the directory when that file says the parameters match and every file
is there with its recorded size (a change of the simulator's code is not noticed: pass
``--resimulate`` after one; ``dataset.json`` records the commit that made the data).
Paper-v1's four 5995 x 5995 micrographs take 575 MB:
the data directory lives under ``--out`` (git-ignored) or ``--data-dir``, never in git.
"""
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import shlex
import shutil
import time
from pathlib import Path

from numbaem.runtime.errors import NumbaemError

# Bump when the way the data are made changes (the digest then changes and the cache is rebuilt).
DATA_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """What ``numbaem simulate`` is asked for (and the molecule it simulates).

    Attributes
    ----------
    name : str
        Prefix of the cache directory.
    L : int
        ``--patch-size``.
    micrograph_size : int
        ``--micrograph-size`` (square micrographs, at the patch scale).
    count : int
        ``--count``.
    density, snr : float
        ``--density``, ``--snr`` (at the generation size: Method 2 keeps it, Method 1
        reports the SNR after downsampling separately).
    method : int
        ``--method``.
    spacing : str
        ``--spacing``.
    volume_size : int
        Side ``L0`` of the synthetic molecule (``numbaem molecule --size``).
    molecule_seed : int
        Seed of the truth molecule.
    init_seed : int
        Seed of the homolog used as the start (``numbaem molecule --seed init_seed
        --homolog-of molecule_seed``).
    seed : int
        ``numbaem simulate --seed``.
    simulate_args : tuple of str
        Further ``numbaem simulate`` options (a CTF, coloured noise: issue 10's suites).
    """

    name: str
    L: int
    micrograph_size: int
    count: int
    density: float = 0.15
    snr: float = 1.0
    method: int = 2
    spacing: str = "separated"
    volume_size: int = 41
    molecule_seed: int = 0
    init_seed: int = 1
    seed: int = 0
    simulate_args: tuple = ()

    def as_json(self):
        d = dataclasses.asdict(self)
        d["simulate_args"] = list(self.simulate_args)
        d["format"] = DATA_FORMAT
        return d

    @property
    def digest(self):
        text = json.dumps(self.as_json(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @property
    def dirname(self):
        return f"{self.name}-{self.digest}"

    @property
    def patches(self):
        """Patches in the data (``count (N // L)^2``)."""
        return self.count * (self.micrograph_size // self.L) ** 2

    @property
    def bytes(self):
        """Bytes of the micrograph files (float32)."""
        return self.count * self.micrograph_size ** 2 * 4


@dataclasses.dataclass
class Dataset:
    """Simulated micrographs on disk.

    Attributes
    ----------
    spec : DataSpec
    directory : pathlib.Path
    micrographs : list of pathlib.Path
    truth : pathlib.Path
        The band-limited truth at side L (``MIC.truth.mrc``).
    volume, init : pathlib.Path
        The molecule (side L0) and the homolog start (side L0).
    simulation : dict
        The simulation's own JSON (``MIC.json``) without positions and rotations.
    reused : bool
        True when the cache was reused; False when simulated in this run.
    simulate_seconds : float
        Wall time of the simulation (when it was made).
    made : dict
        When and by which checkout the data were made (``created``, ``git_commit``,
        ``numbaem_uncommitted``).
    commands : list of str
        The ``numbaem`` commands that made the data (for a user to repeat).
    """

    spec: DataSpec
    directory: Path
    micrographs: list
    truth: Path
    volume: Path
    init: Path
    simulation: dict
    reused: bool
    simulate_seconds: float
    commands: list
    made: dict = None

    @property
    def sigma2(self):
        return float(self.simulation["sigma2"])

    def record(self):
        """What the suites write into their JSON about the data."""
        sim = self.simulation
        return dict(spec=self.spec.as_json(), directory=str(self.directory), reused=self.reused,
                    simulate_seconds=self.simulate_seconds, commands=self.commands, made=self.made,
                    micrographs=[p.name for p in self.micrographs], micrograph_bytes=sum(
                        p.stat().st_size for p in self.micrographs),
                    patches=self.spec.patches, snr_requested=sim.get("snr"), snr_after_downsampling=sim.get(
                        "snr_downsampled"), sigma2=sim.get("sigma2"), sigma2_generation=sim.get("sigma2_gen"),
                    method=sim.get("method"), density=sim.get("density"), density_achieved=sim.get(
                        "density_achieved"), spacing=sim.get("spacing"), L=sim.get("L"), L0=sim.get("L0"),
                    lmax_truth=sim.get("lmax"), shape=sim.get("shape"), count=sim.get("count"),
                    projections_per_micrograph=sim.get("projections_per_micrograph"), seed=sim.get("seed"),
                    volume="synthetic molecule (numbaem molecule --size %d --seed %d)" % (
                        self.spec.volume_size, self.spec.molecule_seed),
                    init="homolog (numbaem molecule --size %d --seed %d --homolog-of %d)" % (
                        self.spec.volume_size, self.spec.init_seed, self.spec.molecule_seed))


# --------------------------------------------------------------------------- the CLI in process

def run_cli(argv):
    """Run ``numbaem ARGV`` in this process; returns its standard error text.

    Raises
    ------
    NumbaemError
        When the command exits with a non-zero status (its message included).
    """
    from numbaem.cli.main import main as cli_main

    argv = [str(a) for a in argv]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = cli_main(argv)
    if status != 0:
        tail = err.getvalue().strip().splitlines()[-3:]
        raise NumbaemError(f"`{command_line(argv)}` exited with status {status}: {' / '.join(tail)}")
    return err.getvalue()


def command_line(argv):
    return "numbaem " + " ".join(shlex.quote(str(a)) for a in argv)


# --------------------------------------------------------------------------- the cache

def _files_ok(directory, files):
    try:
        return all((directory / name).stat().st_size == size for name, size in files.items())
    except OSError:
        return False


def prepare(spec, data_dir, threads=None, resimulate=False):
    """The data of ``spec`` under ``data_dir``: reused when cached, else simulated now.

    Returns
    -------
    Dataset
    """
    data_dir = Path(data_dir)
    final = data_dir / spec.dirname
    manifest = final / "dataset.json"
    if not resimulate and manifest.exists():
        try:
            m = json.loads(manifest.read_text())
        except (OSError, ValueError):
            m = None
        if m and m.get("spec") == spec.as_json() and _files_ok(final, m.get("files", {})):
            return _dataset(spec, final, m, reused=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = data_dir / f".{spec.dirname}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        t0 = time.perf_counter()
        L0, s = spec.volume_size, spec.molecule_seed
        cmds = [
            ["molecule", "-o", "volume.mrc", "--size", L0, "--seed", s, "-q"],
            ["molecule", "-o", "init.mrc", "--size", L0, "--seed", spec.init_seed, "--homolog-of", s, "-q"],
            ["simulate", "volume.mrc", "-o", "mic.mrc", "--patch-size", spec.L, "--micrograph-size",
             spec.micrograph_size, "--method", spec.method, "--density", repr(spec.density), "--snr",
             repr(spec.snr), "--spacing", spec.spacing, "--count", spec.count, "--seed", spec.seed, "-q",
             *spec.simulate_args],
        ]
        for argv in cmds:
            run_cli([_in(tmp, a) for a in argv] + (["--threads", threads] if threads and argv[0] == "simulate"
                                                    else []))
        seconds = time.perf_counter() - t0
        sim = json.loads((tmp / "mic.json").read_text())
        names = list(sim["micrographs"]) + [sim["truth_volume"], "mic.json", "volume.mrc", "init.mrc"]
        from ._common import git_state
        git = git_state() or {}
        m = dict(spec=spec.as_json(), created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), simulate_seconds=seconds,
                 git_commit=git.get("commit"), numbaem_uncommitted=git.get("numbaem_uncommitted"),
                 commands=[command_line(c) for c in cmds],
                 files={n: (tmp / n).stat().st_size for n in names})
        (tmp / "dataset.json").write_text(json.dumps(m, indent=1) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _dataset(spec, final, m, reused=False)


def _in(directory, arg):
    """Output and input file names of the commands live in ``directory``."""
    return str(directory / arg) if isinstance(arg, str) and arg.endswith(".mrc") else arg


def _dataset(spec, directory, manifest, reused):
    sim = json.loads((directory / "mic.json").read_text())
    for big in ("positions", "rotations"):
        sim.pop(big, None)
    return Dataset(spec=spec, directory=directory, micrographs=[directory / n for n in sim["micrographs"]],
                   truth=directory / sim["truth_volume"], volume=directory / "volume.mrc",
                   init=directory / "init.mrc", simulation=sim, reused=reused,
                   simulate_seconds=manifest.get("simulate_seconds"), commands=manifest.get("commands", []),
                   made={k: manifest.get(k) for k in ("created", "git_commit", "numbaem_uncommitted")})
