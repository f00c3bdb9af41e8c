"""What a Ray run needs from the cluster, checked on the driver before any worker starts.

* **Paths.** A Ray job's driver runs in Ray's temporary copy of the ``--working-dir`` and its workers run on other
  machines, so every path is resolved once, on the driver (:func:`resolve_path`; a relative path inside a job's
  copy is refused: it would be read from, or written into, a folder Ray deletes), and inputs are checked from
  every alive node (:func:`missing_on_nodes`).
* **Storage.** Checkpoints go to ``storage_path``: a URI (``s3://``, ``gs://``, ... through pyarrow, as Ray Train
  uses it) or a filesystem path. With more than one alive node a path must be shared: :func:`check_storage` writes
  a marker file on the driver and asks a task pinned to each node to read it back.
* **Run identity.** A run folder ``storage_path/name`` belongs to one training: ``fastrm_run.json`` records its
  training fields and inputs (:func:`run_identity`), the default name is the output folder's name plus a hash of
  them (:func:`default_run_name`), so the same command resumes and a different config never shares a folder, and
  :func:`claim_run` refuses a folder that holds another training (Ray Train prunes old checkpoints inside its run
  folder: sharing one would delete another run's checkpoints).
* **Workers.** Resources per worker (:func:`parse_resources`) and the communication library's environment passed
  to them (:func:`worker_env`). ``ray job submit`` does not pass the submitting shell's environment to the job,
  so at start :func:`worker_network_report` says which interface the workers' rendezvous will use on each node,
  and :func:`rendezvous_hint` turns a rendezvous that cannot connect into one line naming the variables.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping

# One owner for what a run trains, local or Ray (re-exported: callers use them from here).
from fastrm.run_dir import RUN_FILE, identity_hash, input_diffs, run_identity  # noqa: F401

# Environment variables of the communication libraries that the workers get from the driver (interface names,
# timeouts, debug output). They are per-host settings: a value that differs between nodes belongs in that node's
# `ray start` environment instead, which its workers inherit.
COMM_ENV_PREFIXES = ("GLOO_", "NCCL_", "TORCH_NCCL_", "TP_SOCKET_IFNAME")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
# A node's first task of a job also sets up the job's runtime env there (working dir, pip packages), which the
# training workers then reuse: a bound for that, not for the check itself (a second or two).
NODE_CHECK_TIMEOUT_S = 180.0


class ClusterError(RuntimeError):
    """The cluster cannot run this job as configured (storage, paths, run folder); the message says what to do."""


# ----------------------------------------------------------------------------------------------- paths


def is_uri(path: Any) -> bool:
    return isinstance(path, str) and "://" in path


def in_job_working_dir() -> bool:
    """True when this process runs in Ray's copy of a job's ``--working-dir`` (``.../working_dir_files/_ray_pkg_*``)."""
    return "working_dir_files" in Path.cwd().parts


def resolve_path(path: str | os.PathLike | None, what: str) -> str | None:
    """An absolute path on this (the submitting) machine, or a URI unchanged; None stays None.

    Inside a Ray job's working-dir copy a relative path is an error: the job's files are a temporary copy, so an
    output written there is lost and an input read there exists on this node only.
    """
    if path is None or is_uri(path):
        return path
    p = os.path.expanduser(os.fspath(path))
    if not os.path.isabs(p) and in_job_working_dir():
        raise ClusterError(
            f"{what} {p!r} is a relative path, and this Ray job runs in Ray's temporary copy of its working dir "
            f"({Path.cwd()}), which is deleted after the job: pass an absolute path (`$PWD/{p}` expands on your "
            "machine when you submit) or a URI such as s3://bucket/path"
        )
    return os.path.abspath(p)


def resolve_input(x: Any, what: str) -> Any:
    """Make existing local paths absolute (names such as 'tiny-llama' or 'byte', URIs and rows stay as they are)."""
    if isinstance(x, (list, tuple)):
        return [resolve_input(v, what) for v in x]
    if isinstance(x, (str, os.PathLike)) and not is_uri(x) and os.path.exists(x):
        return resolve_path(x, what)
    return x


def local_paths(x: Any) -> list[str]:
    """The absolute local paths in an input spec (lists, rows and names are skipped)."""
    if isinstance(x, (list, tuple)):
        return [p for v in x for p in local_paths(v)]
    return [x] if isinstance(x, str) and os.path.isabs(x) else []


# ----------------------------------------------------------------------------------------------- nodes


def alive_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def node_label(node: Mapping) -> str:
    custom = sorted(k for k in node.get("Resources", {}) if not k.startswith(("node:", "accelerator_type:")))
    custom = [k for k in custom if k not in ("CPU", "GPU", "memory", "object_store_memory")]
    extra = f" {{{', '.join(custom)}}}" if custom else ""
    return f"{node['NodeManagerAddress']} (node {node['NodeID'][:8]}{extra})"


def _probe(paths: list[str], marker: str | None, token: str | None) -> list[str]:
    """Runs on one node: the paths it cannot see (the marker counts as missing unless it holds ``token``)."""
    missing = [p for p in paths if not os.path.exists(p)]
    if marker is not None:
        try:
            ok = Path(marker).read_text() == token
        except OSError:
            ok = False
        if not ok:
            missing.append(marker)
    return missing


def missing_on_nodes(
    paths: Iterable[str],
    *,
    marker: tuple[str, str] | None = None,
    timeout_s: float = NODE_CHECK_TIMEOUT_S,
) -> dict[str, list[str]]:
    """``{node label: paths it does not see}`` over the alive nodes (empty when every node sees every path).

    One zero-CPU task pinned to each node (so busy CPUs do not delay it); a node that does not answer within
    ``timeout_s`` is an error, not a pass.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    paths = list(paths)
    probe = ray.remote(num_cpus=0, max_retries=0)(_probe)
    nodes = alive_nodes()
    refs = {
        probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
            paths, *(marker or (None, None))
        ): n
        for n in nodes
    }
    done, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    if pending:
        for ref in pending:
            ray.cancel(ref, force=True)
        late = ", ".join(node_label(refs[r]) for r in pending)
        raise ClusterError(
            f"node(s) {late} did not answer a file check within {timeout_s:.0f} s: unreachable, overloaded, or still "
            "setting up this job's runtime env (pip packages); raise node_check_timeout_s if that takes longer"
        )
    return {node_label(refs[r]): m for r in done if (m := ray.get(r))}


def check_visible_everywhere(paths: Iterable[str], what: str, timeout_s: float = NODE_CHECK_TIMEOUT_S) -> None:
    """Raise unless every alive node sees every path (nothing to check on a one-node cluster)."""
    paths = list(paths)
    if not paths or len(alive_nodes()) <= 1:
        return
    missing = missing_on_nodes(paths, timeout_s=timeout_s)
    if missing:
        where = "; ".join(f"{node}: {', '.join(m)}" for node, m in missing.items())
        raise ClusterError(
            f"{what} must be readable at the same path on every node, and some nodes do not see it ({where}). Put "
            "it on a filesystem every node mounts at the same path, or copy it to each node"
        )


def check_storage(storage: str, timeout_s: float = NODE_CHECK_TIMEOUT_S, flag: str = "--storage-path") -> None:
    """Raise when ``storage`` is a local path that some alive node does not share (a URI is always fine); the
    message names ``flag``, the option the path came from (``--output-dir`` when it is the default storage).

    A node-local storage path breaks a multi-node run after the first failure: the node that wrote a checkpoint
    is not the one that needs it. The check writes ``.fastrm-shared-<token>`` on the driver and reads it from a
    task on every node.
    """
    if is_uri(storage) or len(alive_nodes()) <= 1:
        return
    token = uuid.uuid4().hex
    marker = Path(storage) / f".fastrm-shared-{token[:12]}"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(token)
    try:
        missing = missing_on_nodes([], marker=(str(marker), token), timeout_s=timeout_s)
    finally:
        marker.unlink(missing_ok=True)
    if missing:
        what = f"{flag} {storage}" + (" (the default --storage-path)" if flag != "--storage-path" else "")
        raise ClusterError(
            f"{what} is not shared: node(s) {', '.join(missing)} of this {len(alive_nodes())}-node "
            "cluster do not see files written there by the driver, so a checkpoint written on one node could not be "
            "resumed on another. Use a filesystem every node mounts at the same path (NFS, ...) or a URI "
            "(s3://bucket/path, gs://bucket/path)" + (" with --storage-path" if flag != "--storage-path" else "")
        )


# ----------------------------------------------------------------------------------------------- run identity


def storage_fs(path: str):
    """``(pyarrow filesystem, path on it)`` for a URI or an absolute local path (as Ray Train resolves storage)."""
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(path)


def default_run_name(output_dir: str, identity: Mapping[str, Any]) -> str:
    """``<output folder name>-<8 hex of the identity>``: the same command gets the same name (and resumes), any
    change to what is trained gets another."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(output_dir.rstrip("/")).name).strip("-.") or "fastrm"
    return f"{stem}-{identity_hash(identity)}"


def _read_json(fs, path: str) -> dict | None:
    import pyarrow.fs

    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode())


def claim_run(storage: str, name: str, identity: Mapping[str, Any], *, compare_config) -> str:
    """Return the run folder ``storage/name``, recording ``identity`` there on first use; raise if the folder
    belongs to another training.

    ``compare_config(saved_config, where)`` raises on a training-field difference (the trainer's
    ``check_resumable``); inputs are compared here.
    """
    fs, root = storage_fs(storage)
    run = f"{root.rstrip('/')}/{name}"
    where = f"{storage.rstrip('/')}/{name}"
    saved = _read_json(fs, f"{run}/{RUN_FILE}")
    if saved is None:
        fs.create_dir(run, recursive=True)
        with fs.open_output_stream(f"{run}/{RUN_FILE}") as f:
            f.write(json.dumps({"name": name, **identity}, indent=2, default=str).encode())
        return where
    compare_config(saved.get("config", {}), where)
    diffs = input_diffs(saved.get("inputs", {}), identity["inputs"])
    if diffs:
        raise ClusterError(
            f"{where} holds a run trained on other inputs ({'; '.join(diffs)}). Start fresh under another --name "
            "(or leave --name out: the default name is derived from the config and inputs)"
        )
    return where


def copy_reports(fs, src: str, dst: str, patterns: Iterable[str]) -> list[str]:
    """Copy the files of folder ``src`` whose names match ``patterns`` into ``dst`` (same filesystem)."""
    import pyarrow.fs

    copied = []
    for info in fs.get_file_info(pyarrow.fs.FileSelector(src, allow_not_found=True)):
        if info.type == pyarrow.fs.FileType.File and any(fnmatch.fnmatch(info.base_name, p) for p in patterns):
            fs.copy_file(info.path, f"{dst}/{info.base_name}")
            copied.append(info.base_name)
    return copied


# ----------------------------------------------------------------------------------------------- workers


def parse_resources(text: str | Mapping | None) -> dict[str, float] | None:
    """Resources per worker from JSON (``'{"CPU": 4, "GPU": 1, "accelerator_type:H100": 0.001}'``) or a dict."""
    if text is None:
        return None
    try:
        res = json.loads(text) if isinstance(text, str) else dict(text)
    except json.JSONDecodeError as e:
        raise ValueError(f'--resources-per-worker: not JSON ({e}); e.g. \'{{"CPU": 4, "GPU": 1}}\'') from e
    if not isinstance(res, dict) or not all(
        isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
        for k, v in res.items()
    ):
        raise ValueError(f"--resources-per-worker: expected an object of resource name -> number >= 0, got {text!r}")
    return {k: float(v) for k, v in res.items()}


def worker_env(extra: Iterable[str] = (), environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for the training workers: the driver's communication-library variables (``GLOO_*``,
    ``NCCL_*``, ``TORCH_NCCL_*``, ``TP_SOCKET_IFNAME``) plus ``extra`` entries ``NAME=VALUE`` or ``NAME`` (taken
    from the driver's environment)."""
    environ = os.environ if environ is None else environ
    env = {k: v for k, v in environ.items() if k.startswith(COMM_ENV_PREFIXES)}
    for item in extra:
        name, sep, value = item.partition("=")
        if not name:
            raise ValueError(f"--worker-env {item!r}: expected NAME=VALUE or NAME")
        if not sep:
            if name not in environ:
                raise ValueError(f"--worker-env {name}: not set in this environment (use {name}=VALUE)")
            value = environ[name]
        env[name] = value
    return env


# ----------------------------------------------------------------------------------------------- worker network

# The variables that pick the network interface of the collectives' rendezvous: gloo (CPU workers) and NCCL (GPU).
INTERFACE_VARS = {"gloo": ("GLOO_SOCKET_IFNAME",), "nccl": ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME")}
NOT_FORWARDED = (
    "(a variable exported where you run `ray job submit` does not reach the job: pass --worker-env NAME=VALUE, or "
    "set it in each node's `ray start` environment)"
)


def _network_probe(names: tuple[str, ...]) -> dict:
    """Runs on one node, in the workers' environment: the interface variables and the hostname's address."""
    import socket

    try:
        address = socket.gethostbyname(socket.gethostname())
    except OSError as e:
        address = f"unresolvable ({e})"
    return {"env": {n: os.environ.get(n) for n in names}, "address": address}


def worker_network_report(env: Mapping[str, str], backend: str, timeout_s: float = NODE_CHECK_TIMEOUT_S) -> str | None:
    """One line on the interface the workers' ``backend`` (gloo / nccl) rendezvous will use on each alive node,
    as the workers will see it (each node's environment plus ``env``, the workers' runtime-env variables), or None
    on a one-node cluster (loopback connects a node's workers). Warns where the variable is unset and the hostname
    resolves to a loopback address, which other nodes cannot reach."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = alive_nodes()
    if len(nodes) <= 1:
        return None
    names = INTERFACE_VARS[backend]
    probe = ray.remote(num_cpus=0, max_retries=0)(_network_probe)
    refs = {
        probe.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False),
            runtime_env={"env_vars": dict(env)} if env else None,
        ).remote(names): n
        for n in nodes
    }
    done, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    for ref in pending:
        ray.cancel(ref, force=True)
    seen = {node_label(refs[r]): ray.get(r) for r in done}
    var = names[0]
    unset = {node: info["address"] for node, info in seen.items() if not info["env"][var]}
    if not unset and not pending:
        values = sorted({info["env"][var] for info in seen.values()})
        return f"fastrm: the workers' {var} is {', '.join(values)} on all {len(nodes)} nodes"
    loopback = {node: a for node, a in unset.items() if a.startswith("127.") or a == "::1"}
    where = "; ".join(f"{node}: hostname -> {a}" for node, a in unset.items())
    line = f"fastrm: {var} is not set for the workers on {len(unset)} of {len(nodes)} nodes ({where})"
    if pending:
        line += f"; {len(pending)} node(s) did not answer within {timeout_s:.0f} s"
    if loopback:
        line += (
            f"; {backend} then uses the address the hostname resolves to, a loopback address on "
            f"{len(loopback)} node(s) that the other nodes cannot reach, and the rendezvous fails"
        )
    return f"{line}; set it with --worker-env {var}=<interface> {NOT_FORWARDED}"


_RENDEZVOUS = re.compile(
    r"(Gloo connectFullMesh failed[^\n]*|Unable to find address for: \S+|gloo[^\n]{0,200}(?:Connection refused|"
    r"Connection reset|connect(?:ion)? timed out)[^\n]*|NCCL[^\n]{0,200}(?:socket|Socket|remote process exited|"
    r"Connection refused)[^\n]*)"
)


def rendezvous_hint(error: BaseException, env: Mapping[str, str]) -> str | None:
    """One line for a collective rendezvous that could not connect the workers (it names the interface variables
    and how to set them), or None when ``error`` (or what it wraps) is something else."""
    text, seen = "", set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:  # Ray wraps the worker's exception; its text holds the original
        seen.add(id(e))
        text += f"\n{e}"
        e = e.__cause__ or e.__context__
    m = _RENDEZVOUS.search(text)
    if m is None:
        return None
    backend = "nccl" if m.group(0).startswith("NCCL") else "gloo"  # "Unable to find address" is gloo's
    names = INTERFACE_VARS[backend]
    given = ", ".join(f"{n}={env[n]}" if n in env else f"{n} unset" for n in names)
    return (
        f"the training workers could not connect to each other ({m.group(0).strip()[:240]}): {backend} picks its "
        f"network interface from {' / '.join(names)} (the workers had {given}), else from the address the "
        "hostname resolves to, which is loopback on many cloud images; set it to the cluster network's interface "
        f"(`ip -br addr` lists them), e.g. --worker-env {names[0]}=eth0 {NOT_FORWARDED}"
    )
