"""Exact resume: a run killed with SIGKILL and resumed ends with the same weights (bitwise) and
the same metrics as an uninterrupted run: at three chosen steps, and in a loop of kills at
random moments (during setup, steps, checkpoint writes and pruning). SIGINT / SIGTERM stop a run
at a step boundary with a checkpoint and one line."""

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

STEPS = 12
VOLATILE = ("time", "time/", "tokens_per_s/")  # wall-clock figures differ run to run


def _command(run_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "advantage",
        "train",
        "algorithm=reinforce",
        "model.name_or_path=builtin:tiny-random",
        "data.train=builtin:reverse",
        f"log.run_dir={run_dir}",
        "log.progress=false",
        "log.tensorboard=false",
        "log.report=false",
        "rollout.prompts_per_step=2",
        "rollout.num_generations=4",
        "rollout.max_new_tokens=6",
        f"train.steps={STEPS}",
        "train.lr=1e-3",
        "train.epochs=2",
        "train.minibatches=2",
        "train.deterministic=true",
        "checkpoint.every=1",
        "checkpoint.keep=2",
        "eval.size=0",
        "checkpoint.save_final=false",
        "reward.functions=[helpers:length_reward]",
        *extra,
    ]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).parent) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _records(run_dir: Path) -> dict[int, dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # a line torn by the kill; the resumed run trims it
            continue
        out[rec["step"]] = {
            k: v for k, v in rec.items() if not k.startswith(VOLATILE) and k != "time"
        }
    return out


def _weights_hash(run_dir: Path) -> str:
    last = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    assert last.name == f"step-{STEPS:06d}"
    return hashlib.sha256((last / "policy.safetensors").read_bytes()).hexdigest()


def _resumed_from(stdout: str) -> int | None:
    found = re.search(r"resumed from .*step-\d+ \(step (\d+)\)", stdout)
    return int(found.group(1)) if found else None


def _run_to_end(run_dir: Path, *extra: str) -> tuple[int | None, str]:
    """Run to the last step; (the step it resumed from, None for a fresh start; stderr)."""
    out = subprocess.run(
        _command(run_dir, *extra), env=_env(), capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return _resumed_from(out.stdout), out.stderr


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[str, dict[int, dict]]:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    _run_to_end(run_dir)
    records = _records(run_dir)
    assert sorted(records) == list(range(1, STEPS + 1))
    return _weights_hash(run_dir), records


def _run_and_kill(run_dir: Path, kill_after_step: int) -> int:
    """Start a run and SIGKILL it as soon as `kill_after_step` is logged; return the last step
    logged at the moment of the kill."""
    proc = subprocess.Popen(
        _command(run_dir), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 600
    try:
        while time.time() < deadline:
            if max(_records(run_dir), default=0) >= kill_after_step:
                proc.send_signal(signal.SIGKILL)
                break
            if proc.poll() is not None:
                pytest.fail("the run ended before it could be killed")
            time.sleep(0.01)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return max(_records(run_dir))


def test_sigkill_and_resume_is_exact(tmp_path, uninterrupted):
    expected_hash, expected = uninterrupted
    report = []
    for kill_at in (2, 4, 7):
        run_dir = tmp_path / f"killed-at-{kill_at}"
        killed = _run_and_kill(run_dir, kill_at)
        resumed, _ = _run_to_end(run_dir)  # checkpoint.resume=auto: the newest complete one
        assert resumed is not None and killed - 1 <= resumed <= killed
        got_hash, got = _weights_hash(run_dir), _records(run_dir)
        report.append((killed, resumed, got_hash[:16], expected_hash[:16]))
        assert got_hash == expected_hash, f"weights differ after a kill at step {killed}"
        for step in range(killed + 1, STEPS + 1):
            assert got[step] == expected[step], (
                f"metrics of step {step} differ (killed at {killed})"
            )
        assert sorted(got) == list(range(1, STEPS + 1))  # no step lost or logged twice
    print("\nSIGKILL after step | resumed from checkpoint | sha256(final weights) | uninterrupted")
    for killed, resumed, got, exp in report:
        print(f"  {killed} | step {resumed} | {got}… | {exp}…")


# ---- SIGKILL at random moments ------------------------------------------------------------------

KILLS = 12
SEED = 20261124  # the moments are drawn from this seed; where they land depends on the machine
CHECKPOINT_FILES = ("trainer_state.json", "policy.safetensors", "optimizer.pt", "rng-rank0.pt")


def _complete(folder: Path) -> bool:
    """Every file of a checkpoint is there and its state parses (stricter than the marker)."""
    try:
        json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return all((folder / f).is_file() and (folder / f).stat().st_size for f in CHECKPOINT_FILES)


def _checkpoints(run_dir: Path) -> tuple[int | None, list[str], list[str]]:
    """(newest complete step, folders that carry the completion marker but are not complete,
    dot-folders: temporary, replaced or pruned checkpoints)."""
    root = run_dir / "checkpoints"
    folders = sorted(root.iterdir()) if root.is_dir() else []
    steps = [int(p.name[5:]) for p in folders if p.name.startswith("step-") and _complete(p)]
    broken = [
        p.name
        for p in folders
        if p.name.startswith("step-") and (p / "trainer_state.json").exists() and not _complete(p)
    ]
    return max(steps, default=None), broken, [p.name for p in folders if p.name.startswith(".")]


def _wait(condition, proc: subprocess.Popen, timeout: float = 120) -> bool:
    """Poll `condition` every millisecond; False when the run ended first."""
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None or time.time() > deadline:
            return False
        time.sleep(0.001)
    return True


def _kill_at_random(run_dir: Path, log: Path, rng: random.Random) -> tuple[str, float] | None:
    """One life of the run: start it, SIGKILL it at a moment drawn from `rng` (None: it ended
    first). Moments: a delay after the start, cut short when the loop starts (setup and resume),
    a delay into a checkpoint write, the instant a new checkpoint is renamed into place (the
    pruning that follows), a delay after the loop starts, cut short when this life logs its first
    step. The cuts keep a life's progress to a step or so on a fast machine as on a slow one."""
    kind = rng.choice(["setup", "checkpoint write", "prune", "step"])
    delay = {"setup": rng.uniform(0.5, 4.0), "checkpoint write": rng.uniform(0.0, 0.06)}.get(
        kind, rng.uniform(0.0, 0.4) if kind == "step" else 0.0
    )
    root = run_dir / "checkpoints"
    with log.open("w") as out:
        proc = subprocess.Popen(_command(run_dir), env=_env(), stdout=out, stderr=out)

    def started() -> bool:  # the loop starts right after the line that gives B
        return "B = " in log.read_text()

    start = time.time()

    def late() -> bool:
        return time.time() - start >= delay

    try:
        if kind == "setup":
            ok = _wait(lambda: late() or started(), proc)
        else:
            ok = _wait(started, proc)
            if ok and kind == "checkpoint write":
                ok = _wait(lambda: any(root.glob(".tmp-step-*")), proc) and _sleep_alive(
                    proc, delay
                )
            if ok and kind == "prune":
                before = {p.name for p in root.glob("step-*")}
                ok = _wait(lambda: {p.name for p in root.glob("step-*")} - before, proc)
            if ok and kind == "step":  # the resume has trimmed the metrics by now
                start, logged = time.time(), max(_records(run_dir), default=0)
                ok = _wait(lambda: late() or max(_records(run_dir), default=0) > logged, proc)
        if not ok:
            return None
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    return kind, delay


def _sleep_alive(proc: subprocess.Popen, seconds: float) -> bool:
    time.sleep(seconds)
    return proc.poll() is None


def test_sigkill_at_random_moments_resumes_exactly(tmp_path, uninterrupted):
    expected_hash, expected = uninterrupted
    run_dir, rng, rows = tmp_path / "run", random.Random(SEED), []
    for life in range(1, KILLS + 1):
        newest_before, _, _ = _checkpoints(run_dir)
        log = tmp_path / f"life-{life}.log"
        killed = _kill_at_random(run_dir, log, rng)
        output = log.read_text()
        resumed = _resumed_from(output)
        # a restart resumes from the newest complete checkpoint, never a damaged one
        assert "Traceback" not in output and "damaged" not in output, output[-2000:]
        assert resumed == newest_before or ("B = " not in output and resumed is None), (
            life,
            resumed,
            newest_before,
        )
        if killed is None:  # it finished before the moment came
            break
        newest, broken, aside = _checkpoints(run_dir)
        assert broken == [], f"life {life}: {broken} carry the marker but are incomplete"
        phase = (
            "setup/resume"
            if "B = " not in output
            else "checkpoint write"
            if any(a.startswith(".tmp-") for a in aside)
            else "replace/prune"
            if aside
            else "step"
        )
        rows.append((life, *killed, phase, newest_before, resumed, newest, aside))
    kills, newest_before = len(rows), _checkpoints(run_dir)[0]
    resumed, stderr = _run_to_end(run_dir)
    assert "damaged" not in stderr
    assert resumed == (None if killed is None else newest_before)  # None: "already finished"
    got_hash, got = _weights_hash(run_dir), _records(run_dir)
    print(f"\n{kills} SIGKILLs (seed {SEED}); then a run to the end resumed from step {resumed}")
    print("life | aimed at (delay s) | landed in | resumed from | newest complete after | aside")
    for life, kind, delay, phase, before, from_, newest, aside in rows:
        start = f"step {from_}" if from_ else "fresh" if before is None else "(killed before)"
        print(f"  {life} | {kind} ({delay:.3f}) | {phase} | {start} | {newest} | {aside or ''}")
    print(f"final weights sha256 {got_hash[:16]}… uninterrupted {expected_hash[:16]}…")
    assert kills >= 10
    assert got_hash == expected_hash
    assert got == expected  # every step logged once, every metric equal


# ---- SIGINT / SIGTERM ---------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_at_a_step_boundary_with_a_checkpoint(tmp_path, signum):
    run_dir = tmp_path / "run"
    never = ("train.steps=1000", "checkpoint.every=0")  # no checkpoint but the one on stopping
    proc = subprocess.Popen(
        _command(run_dir, *never),
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while max(_records(run_dir), default=0) < 2:
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    name, step = signal.Signals(signum).name, max(_records(run_dir))
    assert proc.returncode == 128 + signum, stderr[-2000:]
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        f"stopped by {name} after step {step} of 1000: checkpoint saved in "
        f"{run_dir / 'checkpoints' / f'step-{step:06d}'}; run the same command again to "
        "continue from it"
    )
    assert _checkpoints(run_dir)[0] == step
    resumed, _ = _run_to_end(run_dir, f"train.steps={step + 1}")
    assert resumed == step


def test_one_ctrl_c_reaching_a_torchrun_worker_twice_is_one_signal(monkeypatch):
    # a probe: torchrun forwards the Ctrl-C its workers got from the terminal already; the
    # second copy counted as "Ctrl-C again" and the run died without its checkpoint (3 of 8)
    from advantage.rl.stopping import StopSignals

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    stop = StopSignals(is_main=False)
    stop._handle(signal.SIGINT, None)
    stop._handle(signal.SIGINT, None)  # torchrun's copy, at once: the same signal
    assert stop.received == signal.SIGINT
    stop._when -= 2  # a second Ctrl-C, later: stop at once
    with pytest.raises(KeyboardInterrupt):
        stop._handle(signal.SIGINT, None)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    alone = StopSignals(is_main=False)  # not under torchrun: a repeat is a second Ctrl-C
    alone._handle(signal.SIGINT, None)
    with pytest.raises(KeyboardInterrupt):
        alone._handle(signal.SIGINT, None)
