import importlib.util
import logging
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml

from kd.config import parse_task_config
from kd.settings import STUDENT_ARCHS

ROOT = Path(__file__).resolve().parent.parent


def load_benchmark(name: str):
    """A script of benchmarks/ as a module (benchmarks/ is no package)."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _small_threads():
    torch.set_num_threads(2)


def _outputs() -> set[Path]:
    return {path for folder in ("cache", "runs", "teachers") for path in (ROOT / folder).rglob("*")}


@pytest.fixture(scope="session", autouse=True)
def _checkout_left_alone():
    """Tests write into their temporary folders only: a run with a default --cache_dir or --output_dir
    would fill the checkout's own (and replay from it in a later session)."""
    before = _outputs()
    yield
    assert _outputs() <= before, f"tests wrote into the checkout: {sorted(map(str, _outputs() - before))}"


def tiny_task_raw(checkpoint_dir: Path, classes=("a", "b", "c"), size=8) -> dict:
    """A task config mapping with two tiny teachers of different families (timm's test models: a few
    thousand parameters, so the run machinery, not arithmetic, is what the tests spend their time on)."""
    return {
        "name": "T",
        "description": "synthetic",
        "data": {"source": "digits", "input_size": size, "channels": 1},
        "classes": list(classes),
        "normalization": {"mean": [0.5], "std": [0.25]},
        "augment": {"crop_padding": 1, "hflip": False},
        "teachers": [
            {"name": "resnet", "arch": "test_resnet", "checkpoint": str(checkpoint_dir / "resnet.safetensors"),
             "recipe": {"epochs": 1, "batch_size": 16}},
            {"name": "effnet", "arch": "test_efficientnet",
             "checkpoint": str(checkpoint_dir / "effnet.safetensors"), "recipe": {"epochs": 1, "batch_size": 16}},
        ],
    }


def write_task(folder: Path, teachers: Path | None = None) -> Path:
    """The tiny task over scikit-learn's digits at 8x8 as a config file in `folder`; its teachers
    resolve to `folder`/teachers, where a copy of `teachers` (trained ones) is put when given."""
    raw = tiny_task_raw(Path("teachers"))  # relative: resolves beside the config file
    raw.update(classes=[str(i) for i in range(10)], data={"source": "digits", "input_size": 8, "channels": 1})
    path = folder / "digits8.yaml"
    path.write_text(yaml.safe_dump(raw))
    if teachers is not None:
        shutil.copytree(teachers, folder / "teachers", dirs_exist_ok=True)
    return path


@pytest.fixture(scope="session")
def tiny_teachers(tmp_path_factory) -> Path:
    """The tiny task's two teachers (1 epoch each with their recipes), trained once per test session:
    the folder to hand to write_task."""
    from kd.training import TrainSettings, train_teachers

    folder = tmp_path_factory.mktemp("tiny_teachers")
    torch.set_num_threads(2)
    return train_teachers(TrainSettings(task=str(write_task(folder)), device="cpu"))


# timm's test models of the students' families (0.1-0.4 M parameters, about 8x faster steps on 8 px)
TINY_STUDENTS = {"MobileNetV3": "test_efficientnet", "EfficientNet": "test_efficientnet", "ResNet18": "test_resnet"}


@pytest.fixture
def tiny_students(monkeypatch):
    """Every student name builds a tiny model of its family: for tests of the run machinery (records,
    resume, evaluation), which check what a run does, not what a real student reaches;
    tests/test_models.py keeps the real students."""
    for name, arch in TINY_STUDENTS.items():
        monkeypatch.setitem(STUDENT_ARCHS, name, arch)


@pytest.fixture
def kd_log(caplog, monkeypatch):
    """caplog for the project's logger, which stops propagation once a run has set up its console."""
    monkeypatch.setattr(logging.getLogger("kd"), "propagate", True)
    with caplog.at_level(logging.INFO, logger="kd"):
        yield caplog


@pytest.fixture
def tiny_task(tmp_path):
    return parse_task_config(tiny_task_raw(tmp_path / "teachers"), "tiny")


def with_random_head(model):
    """A new model predicts the uniform distribution (its classifier starts at zero); tests that need
    teachers with distinct outputs give it a random classifier."""
    torch.nn.init.normal_(model.backbone.get_classifier().weight, std=0.5)
    return model


def assert_same_run(a: Path, b: Path) -> None:
    """Two run folders hold the same metrics and the same final weights, bit for bit."""
    from kd.checkpoint import load_torch_checkpoint

    assert (a / "metrics.csv").read_text() == (b / "metrics.csv").read_text()
    state_a = load_torch_checkpoint(a / "checkpoint_last.pt")
    state_b = load_torch_checkpoint(b / "checkpoint_last.pt")
    assert state_a["model"].keys() == state_b["model"].keys()
    assert all((state_a["model"][k] == state_b["model"][k]).all() for k in state_a["model"])


def run_in_process(train_argv: list[str], capsys) -> Path:
    """`python train.py ARGV` in this process (a new process spends seconds importing torch and timm):
    the run folder it prints."""
    import train

    train.main(train_argv)
    return Path(capsys.readouterr().out.strip().splitlines()[-1])


def script_command(script: str, argv: list[str], tiny: bool = False) -> list[str]:
    """`python SCRIPT ARGV` for a script of the project (train.py, tune.py), to start from any folder;
    tiny: with the students of tiny_students."""
    launcher = [str(ROOT / "tests" / "tiny_students.py")] if tiny else []
    return [sys.executable, *launcher, str(ROOT / script), *argv]


def killed_after_first_checkpoint(command: list[str], output_dir: Path, linger: float = 0.0) -> Path:
    """Start a train_command as a process of its own, with this process's thread count (so it computes
    bit for bit what a run in this process would), kill -9 it `linger` seconds after its first
    checkpoint_last.pt appears in `output_dir`, and return its run folder."""
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL,
                               env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    deadline = time.monotonic() + 300
    while not list(output_dir.glob("*/checkpoint_last.pt")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(linger)
    process.kill()
    assert process.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    return next(output_dir.iterdir())


def signal_when(command: list[str], ready, sig: int, log: Path, cwd: Path = ROOT) -> tuple[int, str]:
    """Start `command` with its output in `log` (a file: a pipe nobody reads can fill up and stall the
    run), send `sig` once `ready()` holds, and return the exit status and the output."""
    return signal_each([(command, ready, sig, log)], cwd)[0]


def signal_each(runs: list[tuple], cwd: Path = ROOT) -> list[tuple[int, str]]:
    """signal_when for several (command, ready, sig, log) at once: the processes start together, so their
    seconds of importing torch overlap; each gets its signal when its own ready() holds."""
    def start(command, log):
        # a shell starts background jobs with SIGINT ignored, and Python keeps an ignored SIGINT ignored:
        # give the run the default disposition, as a terminal would
        with log.open("w") as out:
            return subprocess.Popen(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    processes = []
    waiting, deadline = set(range(len(runs))), time.monotonic() + 300
    try:
        processes += [start(command, log) for command, _, _, log in runs]
        while waiting:
            for i in sorted(waiting):
                _, ready, sig, log = runs[i]
                assert processes[i].poll() is None, f"the run ended before the signal:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"not ready after 300 s:\n{log.read_text()[-3000:]}"
                if ready():
                    processes[i].send_signal(sig)
                    waiting.discard(i)
            time.sleep(0.01)
        results = []
        for process, (_, _, _, log) in zip(processes, runs):
            try:
                results.append((process.wait(timeout=120), log.read_text()))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"still running 120 s after the signal:\n{log.read_text()[-3000:]}") from None
        return results
    finally:
        for process in processes:  # none is left running when an assertion fails
            process.kill()  # a no-op for one that has ended
            process.wait()


@pytest.fixture(scope="session")
def postgres_url():
    """A PostgreSQL server of the test session's own, on a Unix socket in a temporary folder (no TCP
    port): the database of the tuner's many-machines path. Skipped, with the reason, where it cannot start."""
    pytest.importorskip("psycopg2", reason="the PostgreSQL driver psycopg2 is not installed")
    bindir = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)), None)  # Debian's layout
    tool = {name: shutil.which(name) or (bindir and str(bindir / name)) for name in ("initdb", "pg_ctl", "createdb")}
    if not all(tool.values()) or not Path(tool["initdb"]).exists():
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    folder = Path(tempfile.mkdtemp(prefix="kd-pg-"))
    as_user = []
    if os.geteuid() == 0:  # the server refuses to run as root: run it as the postgres account
        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no postgres account to run the server")
        os.chown(folder, account.pw_uid, account.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    port = "5433"  # names the socket file only: listen_addresses='' opens no TCP port

    def pg(*command):
        result = subprocess.run(as_user + [str(c) for c in command], capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            shutil.rmtree(folder, ignore_errors=True)
            pytest.skip(f"PostgreSQL did not start: {(result.stderr or result.stdout).strip().splitlines()[-1:]}")

    pg(tool["initdb"], "-D", folder / "data", "-A", "trust", "-U", "kd", "--no-sync")
    pg(tool["pg_ctl"], "-D", folder / "data", "-l", folder / "server.log", "-w", "-o",
       f"-k {folder} -p {port} -c listen_addresses='' -c fsync=off", "start")
    try:
        pg(tool["createdb"], "-h", folder, "-p", port, "-U", "kd", "tuning")
        yield f"postgresql+psycopg2://kd@/tuning?host={folder}&port={port}"
    finally:
        subprocess.run(as_user + [tool["pg_ctl"], "-D", str(folder / "data"), "-m", "immediate", "stop"],
                       capture_output=True, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)
