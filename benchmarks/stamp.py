"""The stamp every results file carries: device, date, versions, git commit and whether the tree was dirty.

The commit and the dirty flag come from git when git runs here and knows the repository. A copy of the
tree without its history (e.g. shipped to a GPU machine) takes them from the environment instead:
``MPPO_GIT_COMMIT`` (40 hex digits) and ``MPPO_GIT_DIRTY`` (``true``, ``false`` or ``unknown``). Without
either, the commit is ``"unknown"`` and so is the dirty flag: it is ``False`` only on evidence (``git
status`` succeeded and listed nothing, or the environment said ``false``).

"Dirty" means uncommitted changes, tracked or untracked (not ignored), outside ``benchmarks/results/`` and
``training/results/``: results written by an earlier run do not change the code that is measured. The
training side's result and provenance files (loss study, rounds, augmentation) carry the same stamp.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata as _md
import os
import platform
import re
import subprocess

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNKNOWN = "unknown"
_HEX40 = re.compile(r"[0-9a-f]{40}")


def _git(*args, cwd=REPO_ROOT) -> str | None:
    """stdout of ``git args`` in ``cwd``, or None when git is missing or fails (no repository, no commits)."""
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def _env_dirty(value: str) -> bool | str:
    v = value.strip().lower()
    if v in ("true", "1", "yes"):
        return True
    if v in ("false", "0", "no"):
        return False
    if v == UNKNOWN:
        return UNKNOWN
    raise ValueError(f"MPPO_GIT_DIRTY must be true, false or unknown, got {value!r}")


def git_state(cwd=REPO_ROOT, env=None) -> dict:
    """``{"git_commit": sha | "unknown", "git_dirty": True | False | "unknown", "git_source": ...}``.

    ``git_source`` says where they came from: ``"git"``, ``"environment"`` or ``"none"``.
    """
    env = os.environ if env is None else env
    head = _git("rev-parse", "HEAD", cwd=cwd)
    top = _git("rev-parse", "--show-toplevel", cwd=cwd)
    # A tree copied inside some other repository must not take that repository's commit.
    ours = top is not None and os.path.realpath(top.strip()) == os.path.realpath(cwd)
    commit = env.get("MPPO_GIT_COMMIT", "").strip().lower()
    if commit and not _HEX40.fullmatch(commit):
        raise ValueError(f"MPPO_GIT_COMMIT must be a 40-hex-digit commit, got {commit!r}")
    if head is not None and ours and _HEX40.fullmatch(head.strip()):
        if commit and commit != head.strip():
            raise ValueError(f"MPPO_GIT_COMMIT={commit} but git HEAD here is {head.strip()}: unset it, or run "
                             "where the tree has no git history")
        status = _git("status", "--porcelain", "--", ".", ":(exclude)benchmarks/results", ":(exclude)training/results",
                      cwd=cwd)
        return {"git_commit": head.strip(), "git_dirty": UNKNOWN if status is None else bool(status.strip()),
                "git_source": "git"}
    if commit:
        dirty = _env_dirty(env["MPPO_GIT_DIRTY"]) if env.get("MPPO_GIT_DIRTY") else UNKNOWN
        return {"git_commit": commit, "git_dirty": dirty, "git_source": "environment"}
    if env.get("MPPO_GIT_DIRTY"):
        raise ValueError("MPPO_GIT_DIRTY is set but MPPO_GIT_COMMIT is not: give both or neither")
    return {"git_commit": UNKNOWN, "git_dirty": UNKNOWN, "git_source": "none"}


def _version(*dists: str) -> str | None:
    for dist in dists:
        try:
            return _md.version(dist)
        except _md.PackageNotFoundError:
            continue
    return None


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_slug(device) -> str:
    """Folder name under ``benchmarks/results/``: the GPU's name in lower case, or ``cpu-smoke``."""
    device = torch.device(device)
    if device.type == "cuda":
        return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")
    return "cpu-smoke"


def run_stamp(device=None) -> dict:
    """Device, date, versions and git state for a results file (written by code, never by hand); ``device``
    defaults to the first GPU, else the CPU."""
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    return {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device_name(device),
        "device_type": device.type,
        "cpu_count": os.cpu_count(),
        # Other work on the machine slows CPU timings; the 1-minute load average at the start says how much.
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "mppo_kernels": getattr(__import__("mppo_kernels"), "__version__", None),
        **{name: _version(name) for name in ("transformers", "datasets", "accelerate")},
        "liger_kernel": _version("liger-kernel", "liger_kernel"),
        "cut_cross_entropy": _version("cut-cross-entropy", "cut_cross_entropy"),
        "cce_autotune_env": os.environ.get("CCE_AUTOTUNE"),
        **git_state(),
    }


def describe(stamp: dict) -> str:
    """One line for a report header: ``git `abc123def456` (dirty: false, from git)``."""
    commit = stamp.get("git_commit") or UNKNOWN
    shown = commit[:12] if _HEX40.fullmatch(commit) else commit
    dirty = stamp.get("git_dirty", UNKNOWN)
    dirty = {True: "true", False: "false"}.get(dirty, str(dirty))
    return f"git `{shown}` (dirty: {dirty}, from {stamp.get('git_source', 'none')})"
