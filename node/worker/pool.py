"""The worker's process pool: one child process per slot, each fed chunks of tasks.

It knows nothing of the master. The contract:

- a task record is (task_id, name, args_blob, timeout); an outcome is
  (task_id, ok, value_blob, error, seconds), returned in the order the tasks were given;
- a task that overruns its timeout fails alone: the child interrupts it itself
  (SIGALRM) and goes on with its chunk, so outcomes it finished before are kept; a
  task that ignores the interruption (stuck in C code) is killed with its process
  after TIMEOUT_GRACE, and the process is replaced;
- a task that kills its process fails alone; the rest of that chunk goes back to the
  caller, unrun (`Pool.step` returns it);
- after `Pool.drain`, children start no further task: the rest of their chunks goes
  back to the caller, unrun, as they finish the task they are in;
- children exit when their agent dies, even by SIGKILL.
"""

from __future__ import annotations

import collections
import os
import pickle
import signal
import time
import traceback

from node.tasks import Registry

FLUSH_EVERY = 0.2  # a child reports finished tasks at least this often
ERROR_LIMIT = 4000  # characters of a task's traceback kept in its error
PIPELINE_BYTES = 32 * 1024  # chunks up to this size may queue behind a running one
TIMEOUT_GRACE = 2.0  # seconds an interrupted task has to give up before its process is killed


class TaskTimeout(BaseException):
    """Raised inside a task by SIGALRM when its timeout passes (BaseException: a task's
    own `except Exception` does not swallow it)."""


def _describe(exc: BaseException) -> str:
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__.tb_next if exc.__traceback__ else None))
    head = f"{type(exc).__name__}: {exc}"
    return head if len(text) > ERROR_LIMIT else f"{head}\n{text}"


# A pool process's interval timer (SIGALRM) goes off at the running task's deadline or
# at an earlier one, and then sets itself again for the running task's. The tasks of a
# job share a timeout, so their deadlines only grow: the timer is set about once per
# chunk, not twice per task (two system calls are much of a tiny task's cost).
_deadline = None  # monotonic deadline of the running task (None: between tasks)
_armed = None  # monotonic time the timer goes off (None: not set)


def _arm(deadline: float, seconds: float) -> None:
    global _armed
    signal.setitimer(signal.ITIMER_REAL, seconds)
    _armed = deadline


def _disarm() -> None:
    global _armed
    if _armed is not None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        _armed = None


def _on_alarm(_signum, _frame):
    global _armed
    _armed = None
    if _deadline is None:  # between tasks: nothing to interrupt
        return
    left = _deadline - time.monotonic()
    if left > 0:  # set for an earlier deadline: wait for this task's
        _arm(_deadline, left)
        return
    raise TaskTimeout()


def _run_one(registry: Registry, name: str, blob: bytes, timeout: float, max_payload: int) -> tuple:
    """(ok, value_blob, error) of one task, interrupted after `timeout` seconds."""
    global _deadline
    _deadline = time.monotonic() + timeout
    if _armed is None or _deadline < _armed:
        _arm(_deadline, timeout)
    try:
        value = pickle.dumps(registry.get(name)(*pickle.loads(blob)))
    except TaskTimeout:
        return False, None, f"timed out after {timeout:g} s"
    except BaseException as exc:  # a task's SystemExit is its failure, not ours
        return False, None, _describe(exc)
    finally:
        _deadline = None
    if len(value) > max_payload:
        return False, None, f"result is {len(value)} bytes, over the limit of {max_payload}"
    return True, value, None


def _child(conn, current, registry: Registry, max_payload, stop) -> None:
    """A pool process: run chunks; send outcomes in order, at least every FLUSH_EVERY s
    and at once after a timeout (its process may be killed next). Once `stop` is set
    (the agent drains) it runs no further task and sends, after the outcomes, how many
    tasks of the chunk it did not run."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the agent decides when children stop
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGALRM, _on_alarm)
    agent = os.getppid()
    while True:
        try:
            # Siblings forked later hold our pipe's other end too, so the agent's death
            # shows as a new parent, not as EOF: look while idle.
            while not conn.poll(1.0):
                if os.getppid() != agent:
                    return
            chunk = conn.recv()
        except (EOFError, OSError):
            return
        if chunk is None:
            return
        out, flushed, ran = [], time.monotonic(), 0
        for task_id, name, blob, timeout in chunk:
            if stop.value:
                break
            ran += 1
            start = time.monotonic()
            current[0], current[1] = task_id, start
            try:
                ok, value, error = _run_one(registry, name, blob, timeout, max_payload.value)
            except TaskTimeout:  # the alarm went off just as the task returned
                ok, value, error = False, None, f"timed out after {timeout:g} s"
            end = time.monotonic()
            current[1] = 0.0
            out.append((task_id, ok, value, error, int((end - start) * 1e6 + 0.5) / 1e6))  # round(): slower
            if end - flushed >= FLUSH_EVERY or (not ok and error.startswith("timed out")):
                conn.send(out)
                out, flushed = [], end
        _disarm()  # idle: no alarm
        if out:
            conn.send(out)
        if ran < len(chunk):
            conn.send(len(chunk) - ran)


class Slot:
    """One child process and the tasks sent to it (with the epoch each came from), oldest first."""

    def __init__(self, ctx, registry: Registry, max_payload, stop):
        self.current = ctx.RawArray("d", 2)  # task id, monotonic start (0: idle)
        self.conn, child_end = ctx.Pipe()
        self.proc = ctx.Process(target=_child, args=(child_end, self.current, registry, max_payload, stop),
                                daemon=True)
        self.proc.start()
        child_end.close()
        self.inflight: collections.deque = collections.deque()  # (record, epoch)

    def running(self):
        """((record, epoch), seconds running) of the task the child is in, or None."""
        task_id, start = self.current[0], self.current[1]
        if start <= 0:
            return None
        for entry in self.inflight:
            if entry[0][0] == task_id:
                return entry, time.monotonic() - start
        return None

    def overdue(self) -> bool:
        """The running task is past its timeout and the grace to give up."""
        running = self.running()
        return bool(running) and running[1] > running[0][0][3] + TIMEOUT_GRACE

    def stop(self, kill: bool = False) -> None:
        if kill:
            self.proc.kill()
        else:
            try:
                self.conn.send(None)
            except OSError:
                pass
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


class Pool:
    """`concurrency` slots. The owner feeds it with `submit` and collects with `step`."""

    def __init__(self, ctx, concurrency: int, registry: Registry, max_payload):
        self.ctx, self.registry, self.max_payload = ctx, registry, max_payload
        self.stopping = ctx.RawValue("b", 0)  # set by drain(): children start no further task
        self.slots = [self._slot() for _ in range(concurrency)]

    def _slot(self) -> Slot:
        return Slot(self.ctx, self.registry, self.max_payload, self.stopping)

    def drain(self) -> None:
        """Children finish the task they are in and send the rest back unrun (step)."""
        self.stopping.value = 1

    def busy(self) -> bool:
        return any(slot.inflight for slot in self.slots)

    def room(self, chunk: int) -> list:
        """Slots that may take another chunk of up to `chunk` tasks."""
        return [slot for slot in self.slots if len(slot.inflight) <= chunk]

    def submit(self, slot: Slot, records: list, epoch) -> bool:
        """Send a chunk to a slot; False (nothing sent) if it is large and the slot busy:
        neither end may block the other on a full pipe."""
        size = sum(len(record[2]) for record in records)
        if slot.inflight and size >= PIPELINE_BYTES:
            return False
        slot.inflight.extend((record, epoch) for record in records)
        slot.conn.send(records)
        return True

    def wait_list(self) -> list:
        waits = []
        for slot in self.slots:
            waits += [slot.conn, slot.proc.sentinel]
        return waits

    def step(self, ready: list) -> tuple:
        """Collect from the slots among `ready` (from wait_list) and replace dead or
        overdue children. Returns (outcomes, each as (outcome, epoch); records to run
        again, each as (record, epoch))."""
        outcomes, again = [], []
        for slot in list(self.slots):
            broken = False
            if slot.conn in ready:
                try:
                    more, back = self._receive(slot, slot.conn.recv())
                except (EOFError, OSError):
                    broken = True
                else:
                    outcomes += more
                    again += back
            if broken or (slot.proc.sentinel in ready and not slot.proc.is_alive()) or slot.overdue():
                more, rest = self._replace(slot)
                outcomes += more
                again += rest
        return outcomes, again

    def _receive(self, slot: Slot, message) -> tuple:
        """(outcomes, records back unrun) of one message from a slot's child."""
        if isinstance(message, int):  # that many of its oldest tasks were not run (drain)
            return [], [slot.inflight.popleft() for _ in range(message)]
        return self._take(slot, message), []

    def _take(self, slot: Slot, outcomes: list) -> list:
        paired = []
        for outcome in outcomes:
            record, epoch = slot.inflight.popleft()
            if record[0] != outcome[0]:
                raise RuntimeError(f"pool process answered task {outcome[0]} for task {record[0]}")
            paired.append((outcome, epoch))
        return paired

    def _replace(self, slot: Slot) -> tuple:
        """The child died or overran: blame its current task, give back the rest."""
        overdue = slot.overdue()
        slot.proc.kill()
        outcomes, back = [], []
        try:  # outcomes it sent before it stopped still count
            while slot.conn.poll():
                more, unrun = self._receive(slot, slot.conn.recv())
                outcomes += more
                back += unrun
        except (EOFError, OSError):
            pass
        running = slot.running()
        slot.proc.join()
        if running:
            (record, epoch), seconds = running
            if overdue:
                error = f"timed out after {record[3]:g} s (killed: it ignored the interruption)"
            else:
                error = f"worker process died (exit code {slot.proc.exitcode}) while running this task"
            outcomes.append(((record[0], False, None, error, round(seconds, 6)), epoch))
        again = back + [entry for entry in slot.inflight if not running or entry[0][0] != running[0][0][0]]
        slot.inflight.clear()
        slot.conn.close()
        self.slots[self.slots.index(slot)] = self._slot()
        return outcomes, again

    def kill_busy(self) -> list:
        """Drain timeout: kill every busy child. Returns the records they held."""
        held = []
        for i, slot in enumerate(self.slots):
            if slot.inflight:
                slot.proc.kill()
                slot.proc.join()
                held += [entry[0] for entry in slot.inflight]
                slot.inflight.clear()
                slot.conn.close()
                self.slots[i] = self._slot()
        return held

    def stop(self, kill: bool = False) -> None:
        for slot in self.slots:
            slot.stop(kill)

    def next_deadline(self) -> float | None:
        """Seconds until the earliest running task becomes overdue (None: nothing runs)."""
        left = [running[0][0][3] + TIMEOUT_GRACE - running[1] for running in
                (slot.running() for slot in self.slots) if running]
        return max(0.0, min(left)) if left else None
