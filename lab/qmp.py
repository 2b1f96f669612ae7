"""A synchronous QMP client in which every wait is bounded: connect (the greeting and the
capabilities negotiation), each command, and the close.

qemu.qmp's synchronous shim waits forever for a QEMU that accepts the connection but never
answers (stopped by a signal or a debugger after making its socket), and its connect takes no
timeout at all. This wraps qemu.qmp's asyncio client (QMPClient, its public API) on an event
loop of its own and puts asyncio.wait_for around every call, so a silent QEMU costs at most the
time the caller allows and raises QmpTimeout naming the command.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

# Long enough for any command the lab sends to a QEMU that is running (a few ms each; tens
# under load), short enough that a silent one is noticed well inside a boot's timeout.
DEFAULT_TIMEOUT_S = 2.0


class QmpTimeout(TimeoutError):
    """QEMU did not answer `command` within `seconds`."""

    def __init__(self, command: str, seconds: float):
        super().__init__(f"QEMU did not answer QMP {command} within {seconds:.2g} s")
        self.command = command
        self.seconds = seconds


class QmpClosed(ConnectionError):
    """The connection is gone (QEMU exited) or could not be made."""


class QmpError(RuntimeError):
    """QEMU answered with an error (its own message)."""


class Qmp:
    """One QMP connection to a unix socket: `Qmp(path).connect(timeout)`, `cmd(...)`, `close()`."""

    def __init__(self, path: str, timeout_s: float = DEFAULT_TIMEOUT_S):
        # Imported here, once QEMU is starting (qemu.qmp brings asyncio's machinery: ~20 ms, which
        # then overlaps QEMU's own start instead of preceding it).
        from qemu.qmp import QMPClient

        self.path = path
        self.timeout_s = timeout_s
        self._loop = asyncio.new_event_loop()
        self._client = QMPClient("ringlab")
        self.connected = False

    def _run(self, coro, seconds: float, what: str):
        from qemu.qmp import ConnectError, ExecuteError, QMPError, StateError

        try:
            return self._loop.run_until_complete(asyncio.wait_for(coro, max(0.001, seconds)))
        except asyncio.TimeoutError:
            raise QmpTimeout(what, seconds) from None
        except ExecuteError as exc:
            raise QmpError(f"QMP {what}: {exc}") from None
        except (ConnectError, StateError, QMPError, OSError, EOFError) as exc:
            raise QmpClosed(f"QMP {what}: {exc}") from None

    def connect(self, timeout_s: float | None = None) -> None:
        """Connect, read QEMU's greeting and negotiate capabilities, within `timeout_s`."""
        self._run(self._client.connect(self.path), self.timeout_s if timeout_s is None else timeout_s, "connect")
        self.connected = True

    def cmd(self, name: str, args: dict[str, Any] | None = None, timeout_s: float | None = None) -> Any:
        """The command's return value; QmpError for QEMU's error reply."""
        return self._run(self._client.execute(name, args), self.timeout_s if timeout_s is None else timeout_s, name)

    def quit(self, timeout_s: float) -> None:
        """QMP `quit`: the polite first step of ending QEMU (lab/processes.py end_group)."""
        self.cmd("quit", timeout_s=timeout_s)

    def events(self) -> list[dict]:
        """The events that have arrived, without waiting for more (one turn of the loop lets
        the reader take what the socket holds)."""
        self._loop.run_until_complete(asyncio.sleep(0))
        return [dict(e) for e in self._client.events.clear()]

    def close(self, timeout_s: float = 0.5) -> None:
        """Disconnect and end the event loop. Never raises."""
        with contextlib.suppress(Exception):
            self._run(self._client.disconnect(), timeout_s, "disconnect")
        with contextlib.suppress(Exception):
            # A disconnect that timed out leaves the client's reader and writer tasks: cancel
            # them, or the closed loop reports them as destroyed while pending.
            pending = asyncio.all_tasks(self._loop)
            for task in pending:
                task.cancel()
            if pending:
                self._loop.run_until_complete(
                    asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), timeout_s))
        with contextlib.suppress(Exception):
            self._loop.close()
        self.connected = False
