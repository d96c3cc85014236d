"""Real servers and simulated hosts for the scale-out tests: a throw-away PostgreSQL cluster, the
README's scale-out recipe split into the sections each host runs, and hosts as the recipe's
commands see them (a hostname of their own in a UTS namespace, their own HOME, their own
environment). Everything started here is stopped by PID, also when a test fails."""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
README = PROJECT_ROOT / "README.md"
RECIPE_MARKER = "<!-- recipe: scale-out (tests/e2e/test_scale_out.py runs these commands) -->"
# the placeholders of the recipe that a test replaces: every host is 127.0.0.1, every port a free one
RECIPE_HOSTS = ("10.0.0.4", "10.0.0.5")
RECIPE_PORTS = {"postgres": 5432, "prefect": 4200, "mlflow": 5000, "dask": 8786}
RECIPE_FOLDER = "/srv/nllflow"
# the environment variable that marks every process of a simulated host, its descendants included
HOST_MARKER = "NLLFLOW_TEST_HOST"
STOP_SECONDS = 10.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def postgres_bin() -> Path | None:
    """Debian's PostgreSQL binaries (the newest installed version), None where it is not installed."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


def _signal_and_wait(pids: list[int], seconds: float = STOP_SECONDS) -> None:
    """SIGTERM to each PID, SIGKILL to those still there after `seconds`; waits until they are gone."""
    for sig, wait in ((signal.SIGTERM, seconds), (signal.SIGKILL, 5.0)):
        alive = [pid for pid in pids if _alive(pid)]
        for pid in alive:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while any(_alive(pid) for pid in alive) and time.monotonic() < deadline:
            time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


@dataclass
class Postgres:
    """A PostgreSQL cluster of its own: initdb into a fresh directory as the `postgres` system user,
    pg_ctl on a free loopback port, sockets in that directory. Stopped by the postmaster's PID."""

    bin: Path
    port: int = field(default_factory=free_port)
    folder: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="pgtest-", dir="/tmp")))

    @property
    def data(self) -> Path:
        return self.folder / "data"

    def start(self) -> None:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            subprocess.run(["useradd", "--system", "--home-dir", "/var/lib/postgresql", "postgres"], check=True)
            user = pwd.getpwnam("postgres")
        os.chown(self.folder, user.pw_uid, user.pw_gid)
        self.folder.chmod(0o700)
        self._as_postgres(
            [
                str(self.bin / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ]
        )
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.folder} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        self._as_postgres(
            [str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.folder / "pg.log"), "-w", "-t", "60"]
            + ["-o", options, "start"]
        )

    def _as_postgres(self, command: list[str], **kwargs) -> subprocess.CompletedProcess:
        done = subprocess.run(
            ["runuser", "-u", "postgres", "--", *command],
            capture_output=True,
            text=True,
            timeout=90,
            cwd=self.folder,
            **kwargs,
        )
        assert done.returncode == 0, f"{command[0]} failed:\n{done.stdout}\n{done.stderr}\n{self.log_tail()}"
        return done

    def run_as_postgres(self, script: str) -> subprocess.CompletedProcess:
        """A shell script run as the postgres system user, its psql pointed at this cluster."""
        env = {"PATH": os.environ["PATH"], "PGHOST": str(self.folder), "PGPORT": str(self.port), "LANG": "C.UTF-8"}
        return self._as_postgres(
            ["env", *(f"{k}={v}" for k, v in env.items()), "bash", "-euo", "pipefail", "-c", script]
        )

    def log_tail(self) -> str:
        log = self.folder / "pg.log"
        return log.read_text(errors="replace")[-2000:] if log.is_file() else ""

    def stop(self) -> None:
        pid_file = self.data / "postmaster.pid"
        if pid_file.is_file():
            pid = int(pid_file.read_text().splitlines()[0])
            os.kill(pid, signal.SIGINT)  # fast shutdown
            deadline = time.monotonic() + 10
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGQUIT)
                deadline = time.monotonic() + 10
                while _alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.1)
        shutil.rmtree(self.folder, ignore_errors=True)


def recipe_sections(text: str | None = None) -> dict[str, str]:
    """The README's scale-out recipe (the bash block after RECIPE_MARKER), by section: each starts at
    a line `# ---- <who runs it>`; keys are those first words (`database host`, `server host`,
    `each worker host`, `anywhere`)."""
    text = README.read_text() if text is None else text
    start = text.index(RECIPE_MARKER)
    block = re.search(r"```bash\n(.*?)```", text[start:], re.S).group(1)
    sections: dict[str, list[str]] = {}
    current = None
    for line in block.splitlines():
        header = re.match(r"# ---- ([a-z ]+?)(?: \(|:|$)", line)
        if header:
            current = header.group(1)
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
    return {name: "\n".join(lines).strip() + "\n" for name, lines in sections.items()}


def localise(script: str, ports: dict[str, int], folder: Path) -> str:
    """The recipe as it runs on this machine: its hosts 127.0.0.1, its ports `ports` (by RECIPE_PORTS'
    names), its server folder `folder`."""
    for host in RECIPE_HOSTS:
        script = script.replace(host, "127.0.0.1")
    for name, port in RECIPE_PORTS.items():
        script = re.sub(rf"\b{port}\b", str(ports[name]), script)
    return script.replace(RECIPE_FOLDER, str(folder))


@dataclass
class Host:
    """A machine as the recipe's commands see it: its own hostname (a UTS namespace), HOME and
    environment; the repository at the same path (what the recipe asks for). Every process it
    starts carries HOST_MARKER in its environment, so `stop` finds them all, flow runs that a
    worker started in sessions of their own included."""

    name: str
    root: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    token: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __post_init__(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)

    @property
    def home(self) -> Path:
        return self.root / self.name

    @property
    def env(self) -> dict[str, str]:
        return {
            "PATH": os.environ["PATH"],
            "LANG": "C.UTF-8",
            "HOME": str(self.home),
            "TMPDIR": "/tmp",
            HOST_MARKER: self.token,
            **self.extra_env,
        }

    def run(self, script: str, timeout: float) -> subprocess.CompletedProcess:
        """`script` in bash (-euo pipefail) on this host, from the repository root; returns when the
        script does (what it started in the background keeps running)."""
        process = self.start(script)
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
        return subprocess.CompletedProcess(process.args, process.returncode, output, None)

    def start(self, script: str) -> subprocess.Popen:
        """`script` as `run` runs it, in the background: its output is the Popen's stdout."""
        return subprocess.Popen(
            ["unshare", "--uts", "--fork", "bash", "-euo", "pipefail", "-c", f"hostname {self.name}\n{script}"],
            cwd=PROJECT_ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    def processes(self, contains: str = "") -> dict[int, str]:
        """PID → command line of this host's live processes (those whose command line holds `contains`)."""
        found = {}
        marker = f"{HOST_MARKER}={self.token}".encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if marker not in (entry / "environ").read_bytes().split(b"\0"):
                    continue
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
            if contains in command and _alive(int(entry.name)):
                found[int(entry.name)] = command
        return found

    def kill(self, contains: str = "") -> dict[int, str]:
        """SIGKILL, at once, to this host's processes (those whose command line holds `contains`): the
        host, or a part of it, dies. Returns what was killed."""
        victims = self.processes(contains)
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in victims) and time.monotonic() < deadline:
            time.sleep(0.1)
        return victims

    def stop(self) -> None:
        """Every process of this host, by PID: SIGTERM, then SIGKILL."""
        for _ in range(3):  # a process may start another while the first ones stop
            pids = list(self.processes())
            if not pids:
                return
            _signal_and_wait(pids)


def semaphores(pids: list[int]) -> set[Path]:
    """The POSIX semaphores (/dev/shm/sem.*) that these processes have mapped: what multiprocessing
    leaves behind when a process that created one is killed."""
    found = set()
    for pid in pids:
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        found.update(Path(line.split()[-1]) for line in maps.splitlines() if "/dev/shm/sem." in line)
    return found
