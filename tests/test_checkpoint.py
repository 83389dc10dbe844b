"""Checkpoints: round trips, refusals, and bit-exact continuation after a stop or a SIGKILL.

The continuation tests run one small reconstruction (L = 7, lmax 2 then 3, K = 16 then
32, 144 patches, half the patches per iteration so that the generator matters, a memory budget that
splits each iteration into several chunks) without interruption, then again stopped
and continued in several ways, and require the final ``theta`` to be *identical*
(``np.array_equal``), not close. This file doubles as the worker script that the
subprocess tests run (``python tests/test_checkpoint.py DIR CKPT [--graceful]``), so
the in-process and the subprocess runs execute the same code.

``NUMBAEM_KILL_TRIALS`` sets the number of SIGKILL trials (default 5).
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from numbaem.model.basis import FBBasis
from numbaem.cli.signals import GracefulStop
from numbaem.em.plan import INTERPRETER_BYTES
from numbaem.em.checkpoint import Checkpointer, file_fingerprint, run_hash, run_inputs
from numbaem.em.run import EMState, reconstruct
from numbaem.em.schedule import Stage
from numbaem.runtime.errors import InterruptedRun, NumbaemError
from numbaem.data.io import write_image
from numbaem.data.patches import PatchSource
from numbaem.model.projection import project
from numbaem.model.rotations import random_rotations
from numbaem.runtime.threads import use_threads

L = 7
SIGMA2 = 1.0
SEED = 11
THREADS = 2
MEMORY = INTERPRETER_BYTES + 4 * 2 ** 20   # 2-3 chunks per iteration: the chunking is part of what must repeat
SCHEDULE = [Stage(2, 2, 0.5, 16), Stage(3, 4, 0.5, 32)]
N_ITER = sum(s.iters for s in SCHEDULE)
KILL_TRIALS = int(os.environ.get("NUMBAEM_KILL_TRIALS", "5"))
HERE = Path(__file__).resolve()


# --------------------------------------------------------------------------- the problem and one run


def make_micrograph(path, seed=3, cells=6, snr=2.0):
    """An 84 x 84 micrograph (144 patches): projections of a random volume (lmax 3) at well-separated places."""
    rng = np.random.default_rng(seed)
    basis = FBBasis(L, 3)
    theta = rng.standard_normal(basis.M)
    n = cells * cells // 2
    proj = project(theta, basis, random_rotations(n, rng))
    proj *= np.sqrt(snr * SIGMA2 * L * L / np.mean(np.sum(proj ** 2, axis=(1, 2))))
    N = cells * 2 * L
    mic = np.zeros((N, N))
    for p, c in zip(proj, rng.choice(cells * cells, size=n, replace=False)):
        i, j = divmod(int(c), cells)
        o0, o1 = rng.integers(0, L + 1, 2)          # inside its 2L cell: separation >= 2L - 1 not needed here
        mic[2 * L * i + o0:2 * L * i + o0 + L, 2 * L * j + o1:2 * L * j + o1 + L] += p
    mic += rng.standard_normal(mic.shape) * np.sqrt(SIGMA2)
    write_image(path, mic)
    return path


def inputs_for(mic, init="random", **changes):
    kw = dict(L=L, sigma2=SIGMA2, estimate_noise=False, schedule=SCHEDULE, seed=SEED, tikhonov=0.0,
              upsilon0=0.5, init=init, memory=MEMORY)
    kw.update(changes)
    return run_inputs([mic], **kw)


def run(mic, ckpt_dir=None, resume=False, should_stop=None, on_save=None, threads=THREADS):
    """The reconstruction under test, checkpointed into ``ckpt_dir`` (continued with ``resume``)."""
    source = PatchSource.from_files([mic], L)
    with use_threads(threads):
        if ckpt_dir is None:
            return reconstruct(source, "random", sigma2=SIGMA2, schedule=SCHEDULE, rng=np.random.default_rng(SEED),
                               memory=MEMORY, progress=False, should_stop=should_stop).state
        with Checkpointer(ckpt_dir, inputs_for(mic)) as ckpt:
            state = ckpt.begin(resume=resume)

            def callback(st, rec):
                ckpt.save(st, rec)
                if on_save is not None:
                    on_save(st)

            return reconstruct(source, "random", sigma2=SIGMA2, schedule=SCHEDULE, rng=np.random.default_rng(SEED),
                               memory=MEMORY, progress=False, state=state, callback=callback,
                               should_stop=should_stop).state


def worker(argv):
    """Subprocess entry: warm the JIT caches, say 'ready', run (continuing any checkpoint).

    ``--graceful`` runs under :class:`GracefulStop`, sleeps ``--sleep`` seconds after each
    checkpoint (so a signal reliably lands mid-run) and exits 130 when stopped.
    """
    mic, ckpt = argv[0], argv[1]
    graceful = "--graceful" in argv
    pause = float(argv[argv.index("--sleep") + 1]) if "--sleep" in argv else 0.0
    source = PatchSource.from_files([mic], L)
    with use_threads(THREADS):   # JIT caches and FFT plans: not part of the run's arithmetic
        reconstruct(source, "random", sigma2=SIGMA2, schedule=[Stage(2, 1, 0.1, 4), Stage(3, 1, 0.1, 4)],
                    rng=np.random.default_rng(0), memory=MEMORY, progress=False)
    print("ready", flush=True)

    def on_save(st):
        print(f"saved {st.total_iterations}", flush=True)
        if pause:
            time.sleep(pause)

    if not graceful:
        run(mic, ckpt, resume=True, on_save=on_save)
        return 0
    with GracefulStop() as stop:
        state = run(mic, ckpt, resume=True, should_stop=stop.should_stop, on_save=on_save)
    if stop.should_stop():
        print(f"stopped by {stop.signal_name} after iteration {state.total_iterations}; "
              f"the checkpoint in {ckpt} continues it", file=sys.stderr, flush=True)
        return InterruptedRun.exit_code
    return 0


def spawn(tmp, ckpt, *extra):
    env = dict(os.environ, PYTHONPATH=str(HERE.parent.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.Popen([sys.executable, str(HERE), str(tmp / "mic.mrc"), str(ckpt), *extra],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = p.stdout.readline().strip()
    if line != "ready":
        p.kill()
        out, err = p.communicate()
        pytest.fail(f"worker did not start: {line!r}\n{out}\n{err}")
    return p


def test_resume_on_another_thread_count(problem, tmp_path):
    """A run checkpointed on 2 threads continues on 1 (the thread count is not an input:
    it changes no bit) and ends bit for bit where the uninterrupted run ends."""
    seen = []

    def stop_after_two():
        return len(seen) >= 2

    run(problem["mic"], tmp_path, should_stop=stop_after_two, on_save=seen.append, threads=2)
    assert len(seen) == 2
    state = run(problem["mic"], tmp_path, resume=True, threads=1)
    same_run(state, problem["ref"])


def same_run(state, ref):
    """Every number the iterations carry forward, bit for bit."""
    assert np.array_equal(state.theta, ref.theta)
    assert (state.lmax, state.stage, state.iteration, state.total_iterations) == \
           (ref.lmax, ref.stage, ref.iteration, ref.total_iterations)
    assert state.upsilon == ref.upsilon and state.sigma2 == ref.sigma2
    assert state.rng.bit_generator.state == ref.rng.bit_generator.state
    assert [h["loglik"] for h in state.history] == [h["loglik"] for h in ref.history]


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    """The micrograph and the uninterrupted reference run (timed, for the kill delays)."""
    tmp = tmp_path_factory.mktemp("ckpt")
    mic = make_micrograph(tmp / "mic.mrc")
    plain = run(mic)                                       # also compiles / loads the JIT caches
    t0 = time.perf_counter()
    ref = run(mic, tmp / "reference")
    seconds = time.perf_counter() - t0
    return dict(tmp=tmp, mic=mic, ref=ref, plain=plain, seconds=seconds)


# --------------------------------------------------------------------------- hash and fingerprints


def test_run_hash_is_canonical_and_sensitive():
    a = dict(L=7, sigma2=1.5, schedule=[Stage(2, 3, 0.5, 20)], seed=np.int64(4), init="random")
    b = dict(init="random", seed=4, schedule=[dict(lmax=2, iters=3, frac=0.5, rotations=20)],
             sigma2=np.float64(1.5), L=7)
    assert run_hash(a) == run_hash(b)
    assert len(run_hash(a)) == 64
    for key, val in [("sigma2", 1.5000000000000002), ("seed", 5), ("schedule", [Stage(2, 3, 0.25, 20)])]:
        assert run_hash(dict(a, **{key: val})) != run_hash(a)
    with pytest.raises(NumbaemError, match="sigma2"):
        run_hash(dict(a, sigma2=float("nan")))


def test_file_fingerprint_sees_content_not_time(tmp_path):
    p = tmp_path / "m.bin"
    p.write_bytes(bytes(range(256)) * 40000)           # 10 MB: sampled, not hashed whole
    f1 = file_fingerprint(p)
    os.utime(p, (1, 1))
    assert file_fingerprint(p) == f1
    data = bytearray(p.read_bytes())
    data[-5] ^= 1                                      # the last block is always sampled
    p.write_bytes(bytes(data))
    f2 = file_fingerprint(p)
    assert f2["bytes"] == f1["bytes"] and f2["sample_sha256"] != f1["sample_sha256"]


# --------------------------------------------------------------------------- save / load


def _state(rng, M=25, lmax=3):
    theta = rng.standard_normal(M)
    gen = np.random.default_rng(7)
    gen.standard_normal(3)
    return EMState(theta=theta, lmax=lmax, upsilon=0.3141592653589793, sigma2=1.2345678901234567, stage=1,
                   iteration=2, total_iterations=5, rng=gen,
                   history=[dict(iteration=5, loglik=-123.456789012345678, upsilon=0.31)])


def test_save_load_round_trip_is_exact(tmp_path, rng):
    st = _state(rng)
    inputs = dict(L=7, seed=1)
    with Checkpointer(tmp_path / "c", inputs) as ck:
        ck.begin()
        ck.save(st, st.history[-1])
    names = sorted(os.listdir(tmp_path / "c"))
    assert names == ["lock", "state-000005.npz", "state.json"]
    with Checkpointer(tmp_path / "c", inputs) as ck:
        back = ck.load()
    assert np.array_equal(back.theta, st.theta) and back.theta.dtype == np.float64
    assert (back.lmax, back.stage, back.iteration, back.total_iterations) == (3, 1, 2, 5)
    assert back.upsilon == st.upsilon and back.sigma2 == st.sigma2
    assert back.history == st.history
    # the restored generator continues the same stream
    assert np.array_equal(back.rng.integers(0, 2 ** 62, 100), st.rng.integers(0, 2 ** 62, 100))
    assert np.array_equal(back.rng.choice(1000, 50, replace=False), st.rng.choice(1000, 50, replace=False))


def test_only_latest_npz_is_kept_and_leftovers_are_cleaned(tmp_path, rng):
    st = _state(rng)
    d = tmp_path / "c"
    d.mkdir()
    (d / ".state.json.abc.json").write_text("half")    # what a SIGKILL mid-write leaves
    (d / "state-000001.npz").write_bytes(b"orphan")    # an .npz whose state.json never came
    with Checkpointer(d, {}) as ck:
        ck.begin()
        for k in range(3):
            st.total_iterations = 10 + k
            ck.save(st)
    assert sorted(os.listdir(d)) == ["lock", "state-000012.npz", "state.json"]
    assert json.loads((d / "state.json").read_text())["npz"] == "state-000012.npz"


def test_empty_directory_loads_none(tmp_path):
    with Checkpointer(tmp_path / "nothing", {}) as ck:
        assert ck.load() is None
    with Checkpointer(tmp_path / "nothing", {}) as ck:
        assert ck.begin(resume=True) is None


def test_fresh_run_refuses_an_existing_checkpoint_unless_forced(tmp_path, rng):
    st = _state(rng)
    with Checkpointer(tmp_path, {"a": 1}) as ck:
        ck.save(st)
    with Checkpointer(tmp_path, {"a": 1}) as ck:
        with pytest.raises(NumbaemError, match=r"already holds a checkpoint \(iteration 5.*--resume.*--force"):
            ck.begin()
        with pytest.raises(NumbaemError, match="already holds"):
            ck.save(st)                                # a save without begin() checks too
    with Checkpointer(tmp_path, {"a": 2}, force=True) as ck:
        ck.begin()
        assert not ck.exists()
        st.total_iterations = 1
        ck.save(st)
    with Checkpointer(tmp_path, {"a": 2}) as ck:
        assert ck.load().total_iterations == 1


def test_directory_is_locked(tmp_path, rng):
    with Checkpointer(tmp_path, {}) as first:
        first.begin()
        with pytest.raises(NumbaemError, match=f"in use by another numbaem run \\(process {os.getpid()}\\)"):
            Checkpointer(tmp_path, {}).begin(resume=True)
    with Checkpointer(tmp_path, {}) as again:            # released on close
        again.begin(resume=True)


def test_other_inputs_are_refused_naming_the_key(tmp_path, rng):
    st = _state(rng)
    sched = [Stage(2, 3, 0.5, 20).to_dict()]
    inputs = dict(L=7, schedule=sched, seed=1, init={"sha256": "ab"})
    with Checkpointer(tmp_path, inputs) as ck:
        ck.save(st)
    other = dict(inputs, schedule=[Stage(2, 4, 0.5, 20).to_dict()])
    with Checkpointer(tmp_path, other) as ck:
        with pytest.raises(NumbaemError) as err:
            ck.load()
    msg = str(err.value)
    assert '"iters":3' in msg and '"iters":4' in msg and "schedule=" in msg
    assert "seed" not in msg and "another --checkpoint directory" in msg
    with Checkpointer(tmp_path, dict(inputs, seed=2, memory=5)) as ck:
        with pytest.raises(NumbaemError, match=r"made with no memory \(this run: memory=5\); "
                                               r"seed=1 \(this run: seed=2\)\. Use another"):
            ck.load()
    # a continuing run need not give the initial volume again; a different one is refused
    no_init = {k: v for k, v in inputs.items() if k != "init"}
    with Checkpointer(tmp_path, no_init) as ck:
        assert np.array_equal(ck.load().theta, st.theta)
        assert ck.inputs["init"] == {"sha256": "ab"}
    with Checkpointer(tmp_path, dict(inputs, init="random")) as ck:
        with pytest.raises(NumbaemError, match="init="):
            ck.load()


def _saved(tmp_path, rng):
    st = _state(rng)
    with Checkpointer(tmp_path, {}) as ck:
        ck.save(st)
    return tmp_path / "state.json", tmp_path / "state-000005.npz"


def _load(tmp_path):
    with Checkpointer(tmp_path, {}) as ck:
        return ck.load()


@pytest.mark.parametrize("damage, match", [
    ("truncate_json", "cannot be read .* damaged"),
    ("garbage_json", "cannot be read"),
    ("json_list", "not a numbaem checkpoint"),
    ("missing_field", "lacks a field"),
    ("future_format", "format 99"),
    ("edited_inputs", "do not match its own hash"),
    ("missing_npz", "which is missing"),
    ("other_npz", "does not match the sha256 .* torn"),
    ("truncated_npz", "does not match the sha256"),
    ("bad_name", "not a state-NNNNNN.npz"),
    ("bad_rng", "random generator"),
])
def test_damaged_checkpoint_is_refused(tmp_path, rng, damage, match):
    js, npz = _saved(tmp_path, rng)
    doc = json.loads(js.read_text())
    if damage == "truncate_json":
        js.write_text(js.read_text()[:100])
    elif damage == "garbage_json":
        js.write_bytes(b"\x00\xff" * 10)
    elif damage == "json_list":
        js.write_text("[]")
    elif damage == "missing_field":
        del doc["upsilon"]
        js.write_text(json.dumps(doc))
    elif damage == "future_format":
        js.write_text(json.dumps(dict(doc, format=99)))
    elif damage == "edited_inputs":
        js.write_text(json.dumps(dict(doc, inputs={"seed": 3})))
    elif damage == "missing_npz":
        npz.unlink()
    elif damage == "other_npz":
        np.savez(npz, theta=np.zeros(25))              # a complete file, but not the one state.json names
    elif damage == "truncated_npz":
        npz.write_bytes(npz.read_bytes()[:-40])
    elif damage == "bad_name":
        js.write_text(json.dumps(dict(doc, npz="../elsewhere.npz")))
    elif damage == "bad_rng":
        js.write_text(json.dumps(dict(doc, rng=dict(doc["rng"], bit_generator="MT19937"))))
    with pytest.raises(NumbaemError, match=match):
        _load(tmp_path)


def test_pickled_array_is_never_loaded(tmp_path, rng):
    """Even with a matching sha256 (a forged pair), an object array is refused, not unpickled."""
    import hashlib
    js, npz = _saved(tmp_path, rng)
    np.savez(npz, theta=np.array([object()] * 25, dtype=object), allow_pickle=True)
    doc = json.loads(js.read_text())
    doc["npz_sha256"] = hashlib.sha256(npz.read_bytes()).hexdigest()
    js.write_text(json.dumps(doc))
    with pytest.raises(NumbaemError, match="not a readable checkpoint array"):
        _load(tmp_path)


# --------------------------------------------------------------------------- signals


def test_graceful_stop_flag_second_sigint_and_restore():
    before_int, before_term = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with GracefulStop() as stop:
        assert not stop.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.should_stop() and stop() and stop.signal_name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt, match="second signal"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)                              # the handler runs before this returns
    assert signal.getsignal(signal.SIGINT) is before_int
    assert signal.getsignal(signal.SIGTERM) is before_term
    with GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signal_name == "SIGINT"


# --------------------------------------------------------------------------- bit-exact continuation


def test_checkpointing_does_not_change_the_result(problem):
    same_run(problem["plain"], problem["ref"])
    assert all(h["patches"] > h["chunk"] for h in problem["ref"].history), "several chunks per iteration"


@pytest.mark.parametrize("m", [1, 2, 4])
def test_should_stop_then_resume_is_bit_exact(problem, tmp_path, m):
    """Stopped after m iterations (2 is a stage boundary), continued by a new Checkpointer."""
    saves = []
    part = run(problem["mic"], tmp_path, should_stop=lambda: len(saves) >= m, on_save=saves.append)
    assert part.total_iterations == m
    with Checkpointer(tmp_path, inputs_for(problem["mic"])) as ck:
        saved = ck.load()
    # at a stage boundary reconstruct() has already zero-padded theta for the next stage
    # before it polled should_stop; the checkpoint holds the same point before that step
    assert saved.total_iterations == m and saved.history == part.history
    assert np.array_equal(saved.theta, part.theta[:len(saved.theta)]) and not part.theta[len(saved.theta):].any()
    assert saved.rng.bit_generator.state == part.rng.bit_generator.state and saved.upsilon == part.upsilon
    state = run(problem["mic"], tmp_path, resume=True)
    same_run(state, problem["ref"])
    assert state.history[:m] == part.history[:m]


def test_crash_between_the_two_writes_keeps_the_previous_checkpoint(problem, tmp_path, monkeypatch):
    """Dying after the new .npz but before the state.json that names it leaves iteration k - 1 whole."""
    import numbaem.em.checkpoint as C

    real, saves = C.atomic_write_text, []

    def dies_at_third(path, text, force=False):
        if len(saves) == 2:
            raise KeyboardInterrupt("killed between the two writes")
        return real(path, text, force=force)

    monkeypatch.setattr(C, "atomic_write_text", dies_at_third)
    with pytest.raises(KeyboardInterrupt):
        run(problem["mic"], tmp_path, on_save=saves.append)
    monkeypatch.undo()
    assert json.loads((tmp_path / "state.json").read_text())["npz"] == "state-000002.npz"
    assert (tmp_path / "state-000003.npz").exists()   # the orphan of the interrupted save
    same_run(run(problem["mic"], tmp_path, resume=True), problem["ref"])


def test_sigkill_at_random_times_then_resume_is_bit_exact(problem):
    """SIGKILL a worker at seeded random times (every third trial twice), then finish in-process."""
    tmp, ref = problem["tmp"], problem["ref"]
    gen = np.random.default_rng(2024)
    landed = []
    for trial in range(KILL_TRIALS):
        ckpt = tmp / f"kill-{trial}"
        for _ in range(2 if trial % 3 == 2 else 1):
            p = spawn(tmp, ckpt)
            time.sleep(gen.uniform(0.0, 1.1 * problem["seconds"]))
            finished = p.poll() is not None
            p.send_signal(signal.SIGKILL)
            p.communicate()
            js = ckpt / "state.json"
            at = json.loads(js.read_text())["total_iterations"] if js.exists() else 0
            landed.append((trial, "finished" if finished else "killed", at))
        state = run(problem["mic"], ckpt, resume=True)
        same_run(state, ref)
    print(f"\n{KILL_TRIALS} kill-and-resume trials, (trial, outcome, checkpointed iteration): {landed}")
    assert any(o == "killed" and 0 < at < N_ITER for _, o, at in landed), "no kill landed mid-run"


def test_sigterm_stops_at_next_iteration_with_130_and_resumes_bit_exact(problem):
    tmp, ref = problem["tmp"], problem["ref"]
    ckpt = tmp / "sigterm"
    p = spawn(tmp, ckpt, "--graceful", "--sleep", "0.5")
    for k in (1, 2, 3):
        assert p.stdout.readline().strip() == f"saved {k}"
    p.send_signal(signal.SIGTERM)                      # lands in the pause after checkpoint 3
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "stopped by SIGTERM after iteration 3" in err
    assert "saved 4" not in out                        # no iteration started after the signal
    doc = json.loads((ckpt / "state.json").read_text())
    assert (doc["total_iterations"], doc["stage"], doc["iteration"]) == (3, 1, 1)
    same_run(run(problem["mic"], ckpt, resume=True), ref)


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1:]))
