"""Every wait in the engine has a deadline: no lock, condition, event, queue or thread wait without a bound.

An AST pass over ``src/migcore`` (the command line and the bench excepted:
they wait for the user) lists every call that can block without a timeout:
``x.wait()``, ``x.wait_for(p)``, ``x.get()``, ``x.acquire()`` with no
timeout, and ``t.join()`` with no argument. Each one left is in the
allow-list below with the reason its wait ends; a new one fails this test.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "migcore"

#: (file, enclosing function) -> why the wait ends without a timeout of its own
ALLOWED = {
    ("_postcopy_push.py", "run"): "joins the demand reader after closing its link: its read ends at once",
    ("_received.py", "wait"): "joins the service thread after it reported done: it is returning",
    ("_streams.py", "finish"): "joins senders after queueing END; each send is bounded by its connection's timeout",
    ("_streams.py", "close"): "joins stream threads after closing their connections: their reads end at once",
    ("_trackers.py", "over_threads"): "joins CPU-bound kernel threads over a fixed slice: no wait inside",
    ("_received.py", "pause"): "a paused post-copy waits for a recovery or the program's abandon(), by design: "
    "giving the owed pages up is the program's decision (ensure() and wait() keep their own timeouts)",
}

_BLOCKING = {"wait", "wait_for", "get", "acquire", "join"}


def _unbounded(call: ast.Call) -> bool:
    func = call.func
    if not isinstance(func, ast.Attribute) or func.attr not in _BLOCKING:
        return False
    keywords = {k.arg for k in call.keywords}
    if "timeout" in keywords or "block" in keywords or "blocking" in keywords:
        return False
    nargs = len(call.args)
    if func.attr == "join":
        return nargs == 0 and not keywords  # str.join takes an argument; Thread.join() without one waits forever
    if func.attr == "get":
        return nargs == 0 and not keywords  # dict.get takes a key; Queue.get() waits forever
    if func.attr == "wait_for":
        return nargs < 2
    return nargs == 0  # wait(), acquire()


def _waits() -> dict[tuple[str, str], int]:
    found: dict[tuple[str, str], int] = {}
    for path in sorted(SRC.glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Call) and _unbounded(node):
                    key = (path.name, fn.name)
                    found[key] = found.get(key, 0) + 1
    return found


def test_every_wait_without_a_timeout_is_justified() -> None:
    found = _waits()
    unjustified = sorted(set(found) - set(ALLOWED))
    assert not unjustified, f"waits without a deadline: {unjustified} (give them a timeout, or justify them here)"
    stale = sorted(set(ALLOWED) - set(found))
    assert not stale, f"allow-list entries that no longer wait: {stale}"


def test_the_lint_sees_what_it_is_meant_to_see() -> None:
    sample = ast.parse(
        "e.wait()\nq.get()\nt.join()\nl.acquire()\nc.wait_for(p)\n"
        "e.wait(1)\nq.get(timeout=1)\nt.join(2)\nl.acquire(timeout=3)\nc.wait_for(p, 4)\n"
        "','.join(x)\nd.get('k')\nq.get(block=False)\n"
    )
    calls = [n for n in ast.walk(sample) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)]
    flagged = [ast.unparse(c) for c in calls if _unbounded(c)]
    assert flagged == ["e.wait()", "q.get()", "t.join()", "l.acquire()", "c.wait_for(p)"]
