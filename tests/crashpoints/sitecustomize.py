"""Crash points for the fault tests, in every Python process started with this folder on
PYTHONPATH (the driver, and the Ray workers, which inherit its environment): nothing of it is in
the project's code.

CXR_CRASH_AT="NAME:WHEN:N[,NAME:WHEN:N...]": the process SIGKILLs itself at the N-th `os.replace`
onto a path whose last part is NAME (counted in this process), `before` or `after` the rename.
Every state file and folder the project writes is renamed into place (data_pipeline.files), so
these are exactly the moments between two steps: a checkpoint renamed in and its epochs not yet in
MLflow (`ckpt-000002:after`), MLflow's FINISHED and done.json (`done.json:before`), a state
file's new copy written and not renamed in (`history.csv:before`), a store or split build
complete and not in place (`store:before`, `splits:before`).

Each crash point fires once for all processes: CXR_CRASH_DIR holds a file per point fired.
"""

import os

_SPEC = os.environ.get("CXR_CRASH_AT", "")

if _SPEC:
    import signal

    _points = []
    for item in _SPEC.split(","):
        _name, _when, _n = item.split(":")
        _points.append({"name": _name, "when": _when, "n": int(_n), "seen": 0})
    _done = os.environ["CXR_CRASH_DIR"]
    _replace = os.replace

    def _fire(point) -> None:
        marker = os.path.join(_done, f"{point['name']}-{point['when']}-{point['n']}")
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return  # fired already, in this process or another
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)

    def _crashing_replace(src, dst, *args, **kwargs):
        name = os.path.basename(os.fspath(dst).rstrip("/"))
        due = []
        for point in _points:
            if point["name"] == name:
                point["seen"] += 1
                if point["seen"] == point["n"]:
                    due.append(point)
        for point in due:
            if point["when"] == "before":
                _fire(point)
        result = _replace(src, dst, *args, **kwargs)
        for point in due:
            if point["when"] == "after":
                _fire(point)
        return result

    os.replace = _crashing_replace
