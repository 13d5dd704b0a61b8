"""The small case runner shared by the Python pipeline tests: each case prints
one PASS or FAIL line (with its failed checks), and the script's exit status
says whether any failed.

    from casekit import FAILED, RAN, run_case

    def case_x(c, arg):
        c.need(cond, "what is wrong")   # stops the case
        c.check(cond, "what is wrong")  # records and goes on
        return "a note printed after PASS"

    run_case("x. what it checks", case_x, arg)
    sys.exit(1 if FAILED else 0)
"""
import sys
import time
import traceback

FAILED = []  # names of the cases that failed
RAN = []     # names of the cases run


class CheckFailed(Exception):
    pass


class Case:
    """Collects failed checks of one case; `need` stops the case."""

    def __init__(self):
        self.errors = []

    def check(self, cond, msg):
        if not cond:
            self.errors.append(msg)
        return bool(cond)

    def need(self, cond, msg):
        if not cond:
            self.errors.append(msg)
            raise CheckFailed()


def run_case(name, fn, *args):
    """Runs fn(case, *args); a string it returns is printed after PASS.
    Returns whether the case passed."""
    c = Case()
    RAN.append(name)
    t0 = time.monotonic()
    result = None
    try:
        result = fn(c, *args)
    except CheckFailed:
        pass
    except Exception:  # noqa: BLE001 -- a crash of the test is a failure of the case
        c.errors.append("exception:\n" + traceback.format_exc())
    dt = time.monotonic() - t0
    note = result if isinstance(result, str) else None
    if c.errors:
        FAILED.append(name)
        print("FAIL %s (%.1f s)\n    %s" % (name, dt, "\n    ".join(e.replace("\n", "\n    ") for e in c.errors)))
    else:
        print("PASS %s (%.1f s)%s" % (name, dt, (": " + note) if note else ""))
    sys.stdout.flush()
    return not c.errors


def run_selected(cases, args, only_env):
    """Runs each (name, fn) of `cases` as fn(case, *args), or only those whose
    name contains one of the comma-separated words in the environment variable
    `only_env`. Returns how many ran."""
    import os
    only = [w for w in os.environ.get(only_env, "").split(",") if w]
    chosen = [(n, f) for n, f in cases if not only or any(w in n for w in only)]
    for name, fn in chosen:
        run_case(name, fn, *args)
    return len(chosen)


def run_in_tempdir(cases, only, prefix, make_ctx, keep=False):
    """The cross-checks' main loop: runs each (name, fn) of `cases` whose name
    contains one of the words in `only` (a list of comma-separated words; empty:
    all) as fn(case, ctx), ctx = make_ctx(tmp) for a temporary folder that is
    removed afterwards unless `keep`; then finish(). Returns 2 (usage) when no
    case matches."""
    import shutil
    import tempfile
    words = [w for o in only for w in o.split(",") if w]
    chosen = [(n, f) for n, f in cases if not words or any(w in n for w in words)]
    if not chosen:
        print("no case matches %s" % ", ".join(words), file=sys.stderr)
        return 2
    tmp = tempfile.mkdtemp(prefix=prefix)
    t0 = time.monotonic()
    try:
        ctx = make_ctx(tmp)
        for name, fn in chosen:
            run_case(name, fn, ctx)
    finally:
        if keep:
            print("kept %s" % tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    finish(t0)


def finish(t0):
    """Prints the summary line and exits 1 if any case failed."""
    print("%d of %d cases failed%s (%.1f s)" % (len(FAILED), len(RAN), (": " + "; ".join(FAILED)) if FAILED else "",
                                                 time.monotonic() - t0))
    sys.exit(1 if FAILED else 0)
