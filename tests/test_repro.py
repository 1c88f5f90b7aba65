"""A stage reproduced through DVC's Python API with its command called in the task's process
(genre_tasks.registry.repro): what DVC records and what the task sees must be what the
``dvc repro`` process gave."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from genre_tasks.registry import repro
from genre_tasks.registry import workspace as W

BIN = Path(sys.executable).parent


def fake_stage(argv: list[str]) -> int:
    """What the `fakestage <what>` command does."""
    what = argv[0]
    Path("ran.txt").write_text(f"{os.getpid()} {os.environ.get('GENRE_MARK')} {Path.cwd().name} "
                               f"{os.environ.get('DVC_STAGE')}\n")
    print("to stdout", flush=True)
    print("a progress bar\r 50%\r100%", file=sys.stderr)
    logging.getLogger("genre.fake").warning("a warning of the stage")
    if what == "refuse":
        return 2
    if what == "crash":
        raise RuntimeError("boom in the stage")
    if what == "exit":
        sys.exit(3)
    Path("out.txt").write_text("done\n")
    return 0


@pytest.fixture
def ws(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setitem(repro.INPROCESS, "fakestage", f"{__name__}:fake_stage")
    monkeypatch.delenv(repro.INPROCESS_ENV, raising=False)
    path, remote = tmp_path / "ws", tmp_path / "remote"
    path.mkdir()
    subprocess.run([str(BIN / "dvc"), "init", "--no-scm", "-q"], cwd=path, check=True)
    subprocess.run([str(BIN / "dvc"), "remote", "add", "-d", "r", str(remote)], cwd=path, check=True)
    (path / "in.txt").write_text("a\n")
    stages = "".join(f"  {name}:\n    cmd: fakestage {name}\n    deps: [in.txt]\n    outs: [out.txt]\n"
                     for name in ("ok", "refuse", "crash", "exit"))
    (path / "dvc.yaml").write_text("stages:\n" + stages)
    return W.Workspace(path, tmp_path, path / ".dvc" / "cache")


def test_stage_runs_here_with_dvcs_env_and_is_locked_and_pushed(ws, caplog, capfd):
    env_before, cwd_before = dict(os.environ), os.getcwd()
    caplog.set_level(logging.INFO)
    import dvc.repo  # noqa: F401 - DVC installs its stdout/stderr handlers on import

    dvc_handlers = list(logging.getLogger("dvc").handlers)
    assert dvc_handlers

    first = W.run_stage(ws, "ok", env={"GENRE_MARK": "from-the-task"})

    # nothing reached the task's stdout/stderr (Airflow logs stderr at error level): DVC's own
    # handlers were detached during the call, the stage's prints were captured
    printed = capfd.readouterr()
    assert "Running stage" not in printed.out + printed.err and "to stdout" not in printed.out
    assert logging.getLogger("dvc").handlers == dvc_handlers

    assert first["how"] == "computed" and "push_seconds" in first
    pid, mark, cwd, dvc_stage = (ws.path / "ran.txt").read_text().split()
    assert int(pid) == os.getpid(), "no process started for the stage"
    assert (mark, cwd, dvc_stage) == ("from-the-task", "ws", "ok")  # DVC's cwd and variables
    assert (ws.path / "out.txt").read_text() == "done\n"
    assert "out.txt" in (ws.path / "dvc.lock").read_text(), "DVC locked the stage's output"
    echoed = [r.getMessage() for r in caplog.records if r.name == "genre.workspace"]
    for expected in ("| Running stage 'ok':", "| to stdout", "| a progress bar", "|  50%", "| 100%",
                     "| Updating lock file 'dvc.lock'"):
        assert expected in echoed, (expected, echoed)
    # what the stage prints (stdout, stderr) is logged at INFO; its own loggers keep their level
    assert all(r.levelno == logging.INFO for r in caplog.records if r.name == "genre.workspace")
    assert [r.levelno for r in caplog.records if r.name == "genre.fake"] == [logging.WARNING]
    # the task process is as it was
    assert dict(os.environ) == env_before and os.getcwd() == cwd_before
    # DVC's own decisions are unchanged: skipped, then restored from the run-cache
    assert W.run_stage(ws, "ok", env={"GENRE_MARK": "from-the-task"})["how"] == "unchanged"
    for name in ("out.txt", "ran.txt", "dvc.lock"):
        (ws.path / name).unlink()
    assert W.run_stage(ws, "ok", env={"GENRE_MARK": "from-the-task"})["how"] == "run-cache"
    assert not (ws.path / "ran.txt").exists(), "a run-cache hit runs nothing"


def test_stage_exit_codes_are_the_processes(ws):
    with pytest.raises(W.StageFailed) as refused:
        W.run_stage(ws, "refuse")
    assert refused.value.code == 2 and refused.value.refused
    with pytest.raises(W.StageFailed) as exited:
        W.run_stage(ws, "exit")
    assert exited.value.code == 3 and not exited.value.refused
    with pytest.raises(W.StageFailed) as crashed:
        W.run_stage(ws, "crash")
    assert crashed.value.code == 1
    assert "RuntimeError: boom in the stage" in crashed.value.output  # its traceback
    assert not (ws.path / "out.txt").exists()


def test_inprocess_off_runs_dvc_as_a_process(ws, monkeypatch):
    """$GENRE_STAGE_INPROCESS=0: the `dvc repro` process, which starts the command in a shell
    (the fake program is not on PATH there, so the stage fails like any unknown command)."""
    monkeypatch.setenv(repro.INPROCESS_ENV, "0")
    assert not repro.enabled()
    with pytest.raises(W.StageFailed) as failed:
        W.run_stage(ws, "ok")
    assert failed.value.code == 127


def test_only_plain_commands_of_known_programs_run_here():
    assert repro.target_of("genre train") == ("genre_tasks.cli:main", ["train"])
    assert repro.target_of("genre --override configs/tiny.yaml embed") == \
        ("genre_tasks.cli:main", ["--override", "configs/tiny.yaml", "embed"])
    for shell in ("genre train && echo x", "genre train > log", "genre $STAGE", "cp a b",
                  "genre train | tee x", "GENRE_X=1 genre train", "genre 'a b", ""):
        assert repro.target_of(shell) is None, shell


def test_an_echo_that_writes_to_the_redirected_stderr_does_not_loop(capfd, tmp_path, monkeypatch):
    """Outside Airflow the stage lines' logger may write to whatever sys.stderr is *now* (logging's
    last-resort handler): while the command runs that is the line stream itself. Such a write
    goes to the real stderr once, instead of echoing itself until the recursion limit."""
    monkeypatch.chdir(tmp_path)
    echoed = []

    def echo(line: str) -> None:
        echoed.append(line)
        sys.stderr.write(f"logged: {line}\n")  # what logging.lastResort does

    code = repro.run_here(f"{__name__}:fake_stage", ["refuse"], {}, echo)
    assert code == 2
    assert echoed == ["to stdout", "a progress bar", " 50%", "100%"]
    assert capfd.readouterr().err.count("logged: to stdout\n") == 1


def _entries(cache: Path) -> set[str]:
    runs = cache / "runs"
    return {str(p.relative_to(runs)) for p in runs.rglob("*") if p.is_file()} if runs.exists() else set()


def test_the_run_cache_moves_one_stage_at_a_time(ws, tmp_path):
    """A stage pushes its own run-cache entries and fetches only its own key: the other entries
    of a shared cache or remote (every stage run the project ever had) are never copied, yet a
    worker with an empty cache still restores the stage from the remote's entry."""
    remote = tmp_path / "remote"
    foreign = "ab/ab" + "0" * 62 + "/" + "1" * 64  # another stage's run, local and on the remote
    for root in (ws.cache_dir, remote):
        (root / "runs" / foreign).parent.mkdir(parents=True)
        (root / "runs" / foreign).write_text("cmd: other\n")
    local_only = "cd/cd" + "0" * 62 + "/" + "2" * 64
    (ws.cache_dir / "runs" / local_only).parent.mkdir(parents=True)
    (ws.cache_dir / "runs" / local_only).write_text("cmd: other\n")

    assert W.run_stage(ws, "ok")["how"] == "computed"
    own = _entries(ws.cache_dir) - {foreign, local_only}
    assert len(own) == 1, own  # the run DVC just recorded
    assert _entries(remote) == own | {foreign}, "push sent this stage's entry and nothing else"

    # another worker: same run (params, dvc.lock), empty workspace data and an empty DVC cache
    other = W.Workspace(tmp_path / "ws2", tmp_path, tmp_path / "ws2" / ".dvc" / "cache")
    other.path.mkdir()
    subprocess.run([str(BIN / "dvc"), "init", "--no-scm", "-q"], cwd=other.path, check=True)
    subprocess.run([str(BIN / "dvc"), "remote", "add", "-d", "r", str(remote)], cwd=other.path, check=True)
    for name in ("in.txt", "dvc.yaml"):
        (other.path / name).write_text((ws.path / name).read_text())
    assert W.run_stage(other, "ok")["how"] == "run-cache"
    assert not (other.path / "ran.txt").exists() and (other.path / "out.txt").read_text() == "done\n"
    assert _entries(other.cache_dir) == own, "fetched this stage's entry only"
