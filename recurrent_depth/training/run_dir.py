"""The output folder of a training run (`--out`): what a run writes there, and when it may write.

A folder that already holds a run's files is never written over by accident: a new run there is refused unless it
resumes the old one (`resume`) or replaces it (`overwrite`: the old run's files, and only those, are removed first).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from recurrent_depth.training.config import ConfigError

# What `train` writes under --out; other files a user keeps there are left alone.
RUN_FILES = ("metrics.jsonl", "config.json", "checkpoints", "tensorboard")


def run_files(out: Path) -> list[str]:
    """The names in RUN_FILES that exist under `out`."""
    return [name for name in RUN_FILES if (out / name).exists()]


def check_out_path(out: Path) -> None:
    """ConfigError when `out`, or a folder above it, exists as something other than a folder."""
    for p in [out, *out.parents]:
        if p.exists() and not p.is_dir():
            what = "is a file, not a folder" if p == out else "is a file, so no folder can be made under it"
            raise ConfigError(f"--out {str(out)!r}: {str(p)!r} {what}")


def check_out_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse (ConfigError naming the folder and the options) to start a new run over an earlier one."""
    if resume and overwrite:
        raise ConfigError("--resume continues the run in --out and --overwrite deletes it: pass one of them")
    check_out_path(out)
    found = run_files(out)
    if found and not (resume or overwrite):
        raise ConfigError(f"--out {str(out)!r} already holds a training run ({', '.join(found)}); pass --resume to "
                          "continue it, --overwrite to delete it and start again, or choose another --out")


def remove_run(out: Path) -> None:
    """Delete an earlier run's files (RUN_FILES) under `out` so that a new run starts clean."""
    for name in run_files(out):
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
