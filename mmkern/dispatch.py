"""Backend registry and dispatch.

Every torch op of mmkern (see mmkern/ops/) hands its work to `call(op, device, **inputs)`.
A *backend* is a family of kernels (``reference``, ``triton``, ``cuda``, ``cpu``); for each op
it implements, it registers a *kernel*: the function that runs it and a function that lists
the reasons it cannot take given inputs (xformers' ``not_supported_reasons``).

Selection:
- ``auto`` (the default) walks ``PRIORITY`` and takes the first backend with no reasons;
- a forced backend (``with mmkern.backend("triton"):`` or ``MMKERN_BACKEND=triton``) is taken
  if it has no reasons, otherwise ``NoBackendError`` lists them;
- when nothing fits, ``NoBackendError`` lists every backend with its reasons.

``with mmkern.dispatch_log() as log:`` records which backend ran each op inside the block (tests use it
to assert that the backend they name is the one that ran).
"""
from __future__ import annotations

import contextvars
import os
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

# Fastest first. The reference is last: it is always correct and always slow.
PRIORITY = ("cuda", "triton", "cpu", "reference")
ENV_VAR = "MMKERN_BACKEND"


class NoBackendError(ValueError):
    """No backend can run an op on the given inputs (or the forced one cannot)."""


@dataclass
class Kernel:
    run: Callable[..., object]
    # inputs -> reasons this kernel cannot take them ([] = it can)
    reasons: Callable[..., list[str]] = lambda **inputs: []


@dataclass
class Backend:
    name: str
    description: str
    # () -> reasons the whole backend is unusable in this process (missing package, no GPU, ...)
    environment_reasons: Callable[[], list[str]]
    # device -> reason this backend cannot run on tensors of that device, or None
    device_reason: Callable[[torch.device], str | None]
    kernels: dict[str, Kernel] = field(default_factory=dict)


_BACKENDS: dict[str, Backend] = {}
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("mmkern_backend", default=None)


_ENVIRONMENT: dict[str, list[str]] = {}   # backend name -> its environment reasons, asked once (see below)


def register_backend(backend: Backend) -> None:
    _BACKENDS[backend.name] = backend
    forget_environment()


def environment_reasons(name: str) -> list[str]:
    """Why backend `name` is unusable in this process ([] = usable), cached: what it depends on (installed
    packages, the GPU, TRITON_INTERPRET at import, the loaded extension) does not change while the process
    runs, and asking costs ~5 us per backend, paid on every op call under auto dispatch otherwise. A build
    in the process (mmkern.native.reset) calls forget_environment()."""
    reasons = _ENVIRONMENT.get(name)
    if reasons is None:
        reasons = _ENVIRONMENT[name] = list(_BACKENDS[name].environment_reasons())
    return reasons


def forget_environment() -> None:
    _ENVIRONMENT.clear()


def register_kernel(op: str, backend: str, run: Callable[..., object],
                    reasons: Callable[..., list[str]] | None = None) -> None:
    kernel = Kernel(run) if reasons is None else Kernel(run, reasons)
    _BACKENDS[backend].kernels[op] = kernel


def backends() -> dict[str, Backend]:
    """All registered backends, in priority order."""
    return {name: _BACKENDS[name] for name in PRIORITY if name in _BACKENDS}


def available_backends() -> list[str]:
    """Backends usable in this process: their environment is fine and they implement at least one op."""
    return [name for name, b in backends().items() if not environment_reasons(name) and b.kernels]


def _check_name(name: str) -> str:
    if name != "auto" and name not in _BACKENDS:
        known = ", ".join(["auto", *backends()])
        raise ValueError(f"mmkern.backend: unknown backend {name!r}; known backends: {known}")
    return name


class backend:
    """Force a backend (or ``"auto"``) for the mmkern ops called inside a ``with`` block.

    The object may be kept and entered again (``ref = mmkern.backend("reference")``).
    """

    def __init__(self, name: str):
        self.name = _check_name(name)
        self._tokens: list[contextvars.Token] = []

    def __enter__(self) -> "backend":
        self._tokens.append(_forced.set(self.name))
        return self

    def __exit__(self, *exc) -> None:
        _forced.reset(self._tokens.pop())


def forced_backend() -> str:
    """The backend the current context asks for: the innermost `backend()` block, else $MMKERN_BACKEND, else auto."""
    name = _forced.get()
    if name is None:
        name = _check_name(os.environ.get(ENV_VAR, "auto") or "auto")
    return name


def not_supported_reasons(op: str, backend_name: str, device: torch.device, inputs: dict) -> list[str]:
    b = _BACKENDS[backend_name]
    reasons = environment_reasons(backend_name)
    if reasons:
        return list(reasons)
    kernel = b.kernels.get(op)
    if kernel is None:
        return [f"has no kernel for {op}"]
    device_reason = b.device_reason(device)
    if device_reason:
        return [device_reason]
    return kernel.reasons(**inputs)


def select(op: str, device: torch.device, inputs: dict) -> str:
    """The backend that will run `op` on these inputs; NoBackendError when none can."""
    forced = forced_backend()
    candidates = list(backends()) if forced == "auto" else [forced]
    all_reasons: dict[str, list[str]] = {}
    for name in candidates:
        reasons = not_supported_reasons(op, name, device, inputs)
        if not reasons:
            return name
        all_reasons[name] = reasons
    lines = [f"  {name}: " + "; ".join(r) for name, r in all_reasons.items()]
    how = "auto dispatch found no backend" if forced == "auto" else f"the forced backend {forced!r} cannot run it"
    raise NoBackendError(f"mmkern: {how} for {op} on {device.type} tensors:\n" + "\n".join(lines))


# The open dispatch_log blocks. Process-wide, not a context variable: autograd runs CUDA backwards in its own
# threads, and a backward is part of what a block records.
_LOGS: list[list[tuple[str, str]]] = []
_LOGS_LOCK = threading.Lock()


class dispatch_log:
    """Records (op, backend) for every op dispatched while the block is open, in any thread:

        with mmkern.dispatch_log() as log:
            out = mmkern.flash_attn_func(q, k, v)
        assert log.ran("triton", "attention_forward")
    """

    def __init__(self):
        self.calls: list[tuple[str, str]] = []

    def __enter__(self) -> "dispatch_log":
        with _LOGS_LOCK:
            _LOGS.append(self.calls)
        return self

    def __exit__(self, *exc) -> None:
        with _LOGS_LOCK:
            index = next(i for i, calls in enumerate(_LOGS) if calls is self.calls)
            del _LOGS[index]

    def backends(self, op: str | None = None) -> set[str]:
        """The backends that ran `op` (any op when None)."""
        return {name for o, name in self.calls if op is None or o == op}

    def ran(self, backend_name: str, op: str | None = None) -> bool:
        return backend_name in self.backends(op)


def call(op: str, device: torch.device, **inputs):
    """Run `op` on the selected backend."""
    name = select(op, device, inputs)
    if _LOGS:
        with _LOGS_LOCK:
            for calls in _LOGS:
                calls.append((op, name))
    return _BACKENDS[name].kernels[op].run(**inputs)
