"""Run one benchmark case in a fresh process; get back its result, or raise with its traceback.

Shared by benchmarks/storage.py and benchmarks/resume.py: each case (a dict with ``method``,
``backend`` and ``phase``) runs in its own process so that one method's memory and caches never
colour another's figures.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Mapping
from typing import Any

Phase = Callable[[dict[str, Any]], dict[str, Any]]


def _child(phases: Mapping[str, Phase], case: dict[str, Any], conn: Any) -> None:
    try:
        conn.send({"ok": True, **phases[case["phase"]](case)})
    except BaseException:  # noqa: BLE001 - every failure goes back to the parent, with its traceback
        conn.send({"ok": False, "error": traceback.format_exc()})
    finally:
        conn.close()


def run_case(ctx: Any, case: dict[str, Any], phases: Mapping[str, Phase], timeout_s: float) -> dict[str, Any]:
    """Run ``phases[case["phase"]](case)`` in a fresh process of ``ctx``; its result dict."""
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(dict(phases), case, child), daemon=True)
    proc.start()
    child.close()
    what = f"case {case['method']}/{case['backend']}/{case['phase']}"
    try:
        if not parent.poll(timeout_s):
            raise RuntimeError(f"{what} timed out")
        result = parent.recv()
    except EOFError:
        result = {"ok": False, "error": "the case process died without a result"}
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
            proc.join()
    if not result.pop("ok"):
        raise RuntimeError(f"{what} failed (exit {proc.exitcode}):\n{result['error']}")
    return result
