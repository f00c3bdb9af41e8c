"""Ray nodes for the tests: `ray start --block` in a process group of its own, stopped by that group.

Never `ray stop`: it stops every Ray on the machine, including other test runs'. Each node is started with
addresses and ports it reports itself (``--port=0``, ``--dashboard-port=0``: nothing is guessed, so two test runs
on one machine cannot take each other's ports), and :func:`stop` also ends any process still naming the node's temp
dir in its command line (Ray workers of that session), by pid.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))
STARTED = "Ray runtime started."
# Environment of every Ray the tests start (its processes inherit it):
# - Ray Train's controller polls the workers every 2 s and a worker's ray.train.report waits for that poll: 0.2 s.
# - Ray's memory monitor kills workers when the *machine* is above 95% memory, whoever uses it: on a machine shared
#   with other test runs that fails a test for someone else's memory. The kernel's OOM killer still applies.
# - No token auth: a driver process that once connected with token auth keeps sending tokens, and a cluster without
#   it (or with another token) then drops its actors ("Missing authorization header"): every cluster the test
#   process connects to must agree, and these are private to 127.0.0.1 and the test's lifetime.
# - Bounds instead of a per-test alarm (a signal raised inside Ray's blocking C calls surfaces as a SystemError, or
#   not until the call returns): a worker that stops answering Ray Train's health checks fails the run after 300 s
#   (default 600); worker groups that cannot be placed fail after Ray Train's 60 s start timeout; collectives have
#   the tests' collective_timeout_s; best-of-N actors their actor_start_timeout_s; node start-up wait_started().
TEST_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S": "300",
    "RAY_memory_monitor_refresh_ms": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
}


class RayNode:
    """One ``ray start ... --block`` process; ``wrapper`` prefixes the command (e.g. ``unshare -m ...``)."""

    def __init__(self, log: Path, *args: str, env: dict, temp_dir: str, wrapper: tuple[str, ...] = ()):
        self.log, self.temp_dir = Path(log), temp_dir
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                [*wrapper, RAY, "start", "--block", "--disable-usage-stats", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
            )

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def wait_started(self, timeout_s: float) -> str:
        """Block until the node says it started (its log); raise with the log when it exits or takes too long."""
        deadline = time.monotonic() + timeout_s
        while STARTED not in self.tail(100_000):
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"ray start did not finish within {timeout_s:.0f} s:\n{self.tail()}")
            time.sleep(0.5)
        return self.tail(100_000)

    def gcs_address(self) -> str:
        return re.search(r"ray start --address='([^']+)'", self.tail(100_000)).group(1)

    def api_address(self) -> str:
        """The job server's URL as the head printed it (with --dashboard-port=0 the OS chose the port)."""
        return re.search(r"RAY_API_SERVER_ADDRESS='([^']+)'", self.tail(100_000)).group(1)

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL what is left after 10 s, then any leftover of this node's session."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                continue
            if sig == signal.SIGTERM:  # the node is gone; children that ignored SIGTERM share its group
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            break
        for pid in session_processes(self.temp_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def session_processes(temp_dir: str) -> list[int]:
    """Pids of the processes whose command line names ``temp_dir`` (only ever a temp dir a test created)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if temp_dir in cmd:
            pids.append(int(entry.name))
    return pids


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.5):
    """Poll ``predicate`` until it returns a truthy value (returned); TimeoutError naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(interval_s)


def private_mount_prefix(private: Path) -> tuple[str, ...] | None:
    """A command prefix that runs a program in a new mount namespace with an empty tmpfs over ``private``, or None
    where this machine allows no mount namespace (not root, and no unprivileged user namespaces).

    A process started that way sees its own ``private/``: files the test writes there are on "another machine's
    disk" for it, as a node-local path is for another node of a real cluster.
    """
    private.mkdir(parents=True, exist_ok=True)
    (private / ".outside").write_text("visible outside the namespace only\n")
    mount = 'mount -t tmpfs tmpfs "$0" && '
    for ns in (("unshare", "--mount"), ("unshare", "--user", "--map-root-user", "--mount")):
        try:
            probe = subprocess.run(
                [*ns, "sh", "-c", mount + 'test ! -e "$0/.outside"', str(private)], capture_output=True, timeout=30
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return (*ns, "sh", "-c", mount + 'exec "$@"', str(private))
    return None


class JobHead:
    """A private head with a job server (``ray start --head --include-dashboard=true``) for ``ray job submit``
    tests, in its own temp dir; ``stop()`` ends it and everything of its session.

    What it waits for is a condition, never a guess (issue 18): the head picks its own ports and prints the job
    server's address; a submission the head answers with "No available agent" (its job agent registers a few
    seconds after the HTTP server, longer on a loaded machine) is resubmitted under the same id until accepted.
    """

    def __init__(self, log: Path, *, num_cpus: int = 2, start_timeout_s: float = 300):
        import shutil
        import tempfile

        self.temp_dir = tempfile.mkdtemp(prefix="rayh-", dir="/tmp")  # short: Ray's socket paths live under it
        # No token auth on this private head (TEST_ENV; dashboard on 127.0.0.1).
        env = {**os.environ, **TEST_ENV}
        env.pop("RAY_ADDRESS", None)
        self.node = RayNode(
            log,
            "--head",
            f"--num-cpus={num_cpus}",
            "--port=0",
            "--dashboard-port=0",
            "--dashboard-host=127.0.0.1",
            "--include-dashboard=true",
            f"--temp-dir={self.temp_dir}",
            env=env,
            temp_dir=self.temp_dir,
        )
        try:
            self.node.wait_started(start_timeout_s)
            from ray.job_submission import JobSubmissionClient

            self.client = JobSubmissionClient(self.node.api_address())
        except BaseException:
            self.stop()
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            raise

    def submit(self, entrypoint: str, runtime_env: dict, prefix: str = "fastrm", timeout_s: float = 120) -> str:
        """Submit ``entrypoint``; returns the submission id (retried while the job agent is not up yet)."""
        submission_id = f"{prefix}-{os.getpid()}-{time.monotonic_ns()}"

        def submitted() -> bool:
            try:
                self.client.submit_job(submission_id=submission_id, entrypoint=entrypoint, runtime_env=runtime_env)
            except RuntimeError as e:
                if "No available agent" in str(e):
                    return False  # the head's job agent has not registered yet: it says "try again later"
                raise
            return True

        wait_for(submitted, timeout_s, "the head's job agent accepting a submission", interval_s=2)
        return submission_id

    def wait(self, submission_id: str, timeout_s: float = 300):
        """The job's final status (SUCCEEDED, FAILED or STOPPED); an AssertionError with the log tail on timeout."""
        from ray.job_submission import JobStatus

        final = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED)
        try:
            return wait_for(
                lambda: (st := self.client.get_job_status(submission_id)) in final and st,
                timeout_s,
                "the job",
                interval_s=1,
            )
        except TimeoutError as e:
            raise AssertionError(f"{e}; job log tail:\n{self.logs(submission_id)[-3000:]}") from None

    def logs(self, submission_id: str) -> str:
        return self.client.get_job_logs(submission_id)

    def stop(self) -> None:
        import shutil

        self.node.stop()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
