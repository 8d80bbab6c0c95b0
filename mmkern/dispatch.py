"""Backend registry and dispatch.

Every torch op of mmkern (see mmkern/ops/) builds one *problem record* from its flat schema arguments
(a frozen dataclass, validated once: `AttentionProblem`, `NormProblem`, ...) and hands it to
`call(op, problem)`; the forward ops go through `call_memoized`, which validates and ranks each call
*signature* (dtypes, shapes, strides, devices, argument values) once and reuses the choice (see
"per-signature memo"). A *backend* is a family of kernels (``cuda``, ``triton``, ``cpu``, ``torch``,
``reference``); for each op it implements it registers a *kernel*: ``run(problem)`` and
``reasons(problem) -> list[str]``, the reasons it cannot take this problem (xformers'
``not_supported_reasons``; ``[]`` = it can).

Selection:
- ``auto`` (the default) walks the problem's order (``auto_order``: ``PRIORITY``, reordered by the
  input-aware ``RULES`` below) and takes the first backend with no reasons;
- a forced backend (``with mmkern.backend("triton"):`` or ``MMKERN_BACKEND=triton``) is taken if it has
  no reasons, otherwise ``NoBackendError`` lists them;
- when nothing fits, ``NoBackendError`` lists every backend with its reasons.

The rule auto keeps: never slower than the torch call a user would otherwise make. The ``torch``
backend (torch's own fast paths in the input dtype) ranks above the float64 ``reference``, which is the
oracle and the last resort only. Under ``TRITON_INTERPRET=1`` (a test mode: Triton runs on the CPU
through its interpreter, slowly) the order is unchanged, so auto keeps preferring Triton there.

``mmkern.explain(fn, *args, **kwargs)`` runs a call and returns, for every op it dispatched, each
backend's verdict and reasons and the one auto took; ``with mmkern.dispatch_log() as log:`` records
which backend ran each op inside the block (tests use it to assert that what they name is what ran).
"""
from __future__ import annotations

import contextvars
import functools
import importlib
import os
import threading
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch

# The default order, fastest first. `torch` (torch's own kernels) is the floor every faster backend is
# measured against; the float64 reference is last: always correct, always slow.
PRIORITY = ("cuda", "triton", "cpu", "torch", "reference")
ENV_VAR = "MMKERN_BACKEND"

# Every op of mmkern (the torch.library ops of mmkern/ops/); a kernel registered for another name is a bug
# (a misspelt lazy registration would otherwise be a silent "no kernel" reason).
OPS = ("attention_forward", "attention_backward", "kvcache_append", "norm_residual_forward",
       "norm_residual_backward", "add_noise", "get_velocity", "diffusion_loss", "diffusion_loss_backward",
       "ddpm_step", "ddim_step", "euler_step", "euler_scale_model_input", "euler_add_noise", "rotary_embedding")


class NoBackendError(ValueError):
    """No backend can run an op on the given inputs (or the forced one cannot)."""


def _no_reasons(problem) -> list[str]:
    return []


@dataclass
class Kernel:
    run: Callable[[object], object]                       # problem -> the op's outputs
    reasons: Callable[[object], list[str]] = _no_reasons   # problem -> why not ([] = it can)


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
# op -> the function that builds its problem record from the op's schema arguments (mmkern/ops/)
_PROBLEMS: dict[str, Callable[..., object]] = {}


# --------------------------------------------------------------------------- registration

def register_backend(backend: Backend) -> None:
    _BACKENDS[backend.name] = backend
    forget_environment()


def define_problem(op: str, build: Callable[..., object]) -> None:
    """The op layer names how `op`'s problem record is built from its schema arguments (`problem(op, ...)`)."""
    _check_op(op)
    _PROBLEMS[op] = build


def problem(op: str, **inputs):
    """The problem record `op` builds from these schema arguments (validated): what `select` and each
    backend's reasons take. For tests and tools; the ops build their records themselves."""
    if op not in _PROBLEMS:
        importlib.import_module("mmkern")       # the op modules define their builders on import
    return _PROBLEMS[op](**inputs)


def _check_op(op: str) -> None:
    if op not in OPS:
        raise ValueError(f"mmkern.dispatch: unknown op {op!r}; the ops are {', '.join(OPS)}")


def register_kernel(op: str, backend: str, run: Callable[[object], object],
                    reasons: Callable[[object], list[str]] | None = None) -> None:
    _check_op(op)
    _BACKENDS[backend].kernels[op] = Kernel(run) if reasons is None else Kernel(run, reasons)
    forget_selections()


class LazyFunction:
    """`package.module.function`, imported on the first call (a backend's package need not import its kernels,
    e.g. triton, until the dispatcher asks). `resolve()` imports it now (the registration test calls it for
    every registered kernel, so a misspelt module or function fails a test, not a user's call)."""

    def __init__(self, module: str, function: str):
        self.module, self.function = module, function
        self._resolved = None
        self.__qualname__ = f"{module}.{function}"

    def resolve(self) -> Callable:
        if self._resolved is None:
            fn = getattr(importlib.import_module(self.module), self.function, None)
            if not callable(fn):
                raise AttributeError(f"{self.module} has no function {self.function}()")
            self._resolved = fn
        return self._resolved

    def __call__(self, problem):
        return (self._resolved or self.resolve())(problem)

    def __repr__(self) -> str:
        return f"<lazy {self.__qualname__}>"


def register_lazy(backend: str, package: str, table: dict[str, tuple[str, str, str]]) -> None:
    """Registers, for `backend`, each op of `table` (op -> (module of `package`, run function, reasons
    function)) as LazyFunctions: nothing is imported until the dispatcher asks about the op."""
    for op, (module, run, reasons) in table.items():
        register_kernel(op, backend, LazyFunction(f"{package}.{module}", run),
                        LazyFunction(f"{package}.{module}", reasons))


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
    forget_selections()


def backends() -> dict[str, Backend]:
    """All registered backends, in the default priority order."""
    return {name: _BACKENDS[name] for name in PRIORITY if name in _BACKENDS}


def available_backends() -> list[str]:
    """Backends usable in this process: their environment is fine and they implement at least one op."""
    return [name for name, b in backends().items() if not environment_reasons(name) and b.kernels]


# --------------------------------------------------------------------------- forcing a backend

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


# --------------------------------------------------------------------------- input-aware order

class Rule(NamedTuple):
    """When `applies(problem)` holds for `op`, auto tries `first` (in that order) before the rest of PRIORITY."""
    op: str
    why: str
    applies: Callable[[object], bool]
    first: tuple[str, ...]


def _cuda_decode(problem) -> bool:
    return problem.device.type == "cuda" and problem.decode_shaped


@functools.lru_cache(maxsize=None)
def cpu_has_bf16_matmul() -> bool:
    """This CPU multiplies bfloat16 in hardware (AVX-512 BF16 or AMX): torch's oneDNN bf16 GEMMs then run at
    2.5x the float32 rate (measured: 213-237 vs 84-88 GFLOP/s per core on an AMD EPYC with AVX-512 BF16)."""
    probes = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(probe is not None and probe() for probe in probes)


def _cpu_bf16_long_backward(problem) -> bool:
    return (problem.device.type == "cpu" and problem.dtype == torch.bfloat16 and problem.max_seqlen_k >= 512
            and cpu_has_bf16_matmul())


RULES = (
    # The CUDA C++ forward tiles 64 query rows (x the GQA group) per program: at Lq <= 16 it computes 63 of
    # 64 rows for nothing and runs one program per (batch, head), too few to fill the GPU at batch 1. The
    # Triton split-KV path packs the GQA group into a tile's rows and splits the keys across programs.
    # (Triton itself falls back to its normal forward when the keys are too short to split.)
    Rule("attention_forward", "decode shapes (at most 16 queries, no grad, no mask, no dropout) on a GPU: "
         "Triton's split-KV decode before the CUDA kernel", _cuda_decode, ("triton",)),
    # The C++ CPU kernels multiply through MKL's float32 SGEMM (half tiles converted): torch exports no bf16 GEMM
    # (oneDNN's) to call. On a CPU with bf16 hardware, torch's own CPU flash backward, which has one, is faster
    # from about 512 keys (0.75-0.83x measured at L 2048, bf16; the forward is within 10% either way).
    Rule("attention_backward", "bfloat16 on a CPU with bf16 matmul hardware, at least 512 keys: torch's CPU flash "
         "backward (oneDNN bf16 GEMMs) before the C++ kernels (float32 GEMMs)", _cpu_bf16_long_backward, ("torch",)),
)


def auto_order(op: str, problem) -> tuple[str, ...]:
    """The order auto dispatch tries the backends in for this problem: PRIORITY, reordered by the first of
    RULES that applies."""
    for rule in RULES:
        if rule.op == op and rule.applies(problem):
            return (*rule.first, *(name for name in PRIORITY if name not in rule.first))
    return PRIORITY


# --------------------------------------------------------------------------- selection

def not_supported_reasons(op: str, backend_name: str, problem) -> list[str]:
    """Why `backend_name` cannot run `op` on this problem ([] = it can)."""
    b = _BACKENDS[backend_name]
    reasons = environment_reasons(backend_name)
    if reasons:
        return list(reasons)
    kernel = b.kernels.get(op)
    if kernel is None:
        return [f"has no kernel for {op}"]
    device_reason = b.device_reason(problem.device)
    if device_reason:
        return [device_reason]
    return kernel.reasons(problem)


def select(op: str, problem) -> str:
    """The backend that will run `op` on this problem; NoBackendError when none can."""
    forced = forced_backend()
    candidates = [n for n in auto_order(op, problem) if n in _BACKENDS] if forced == "auto" else [forced]
    all_reasons: dict[str, list[str]] = {}
    for name in candidates:
        reasons = not_supported_reasons(op, name, problem)
        if not reasons:
            return name
        all_reasons[name] = reasons
    lines = [f"  {name}: " + "; ".join(r) for name, r in all_reasons.items()]
    how = "auto dispatch found no backend" if forced == "auto" else f"the forced backend {forced!r} cannot run it"
    raise NoBackendError(f"mmkern: {how} for {op} on {problem.device.type} tensors:\n" + "\n".join(lines))


# --------------------------------------------------------------------------- recording what ran

# The open dispatch_log / explain blocks. Process-wide, not a context variable: autograd runs CUDA backwards
# in its own threads, and a backward is part of what a block records.
_LOGS: list["dispatch_log"] = []
_LOGS_LOCK = threading.Lock()


class dispatch_log:
    """Records every op dispatched while the block is open, in any thread:

        with mmkern.dispatch_log() as log:
            out = mmkern.flash_attn_func(q, k, v)
        assert log.ran("triton", "attention_forward")

    `calls`: (op, backend) per call, in order; `problems`: the problem record of each call (same order).
    """

    def __init__(self):
        self.calls: list[tuple[str, str]] = []
        self.problems: list[object] = []

    def __enter__(self) -> "dispatch_log":
        with _LOGS_LOCK:
            _LOGS.append(self)
        return self

    def __exit__(self, *exc) -> None:
        with _LOGS_LOCK:
            index = next(i for i, log in enumerate(_LOGS) if log is self)
            del _LOGS[index]

    def record(self, op: str, name: str, problem) -> None:
        self.calls.append((op, name))
        self.problems.append(problem)

    def backends(self, op: str | None = None) -> set[str]:
        """The backends that ran `op` (any op when None)."""
        return {name for o, name in self.calls if op is None or o == op}

    def ran(self, backend_name: str, op: str | None = None) -> bool:
        return backend_name in self.backends(op)


def call(op: str, problem):
    """Run `op` on the selected backend."""
    return _run(op, select(op, problem), problem)


def _run(op: str, name: str, problem):
    if _LOGS:
        with _LOGS_LOCK:
            for log in _LOGS:
                log.record(op, name, problem)
    return _BACKENDS[name].kernels[op].run(problem)


# --------------------------------------------------------------------------- per-signature memo

# A server's decode step or a sampler's loop calls the same op on the same shapes thousands of times, and on a
# CPU the kernel of such a call takes a few microseconds: validating the arguments again (~9 us for add_noise's
# four tensors on the 2-core CI machine) and ranking the backends again (~5 us) would cost more than the kernel.
# Both depend only on the call's *signature*: each tensor's dtype, shape, strides, device and requires_grad,
# and every other argument's type and value (the backends' reasons read nothing else: no tensor data, no
# address, no global state but their environment, which forget_environment() resets). So the first call of a
# signature is validated in full and its backend chosen; later calls build the record without the metadata
# checks (value checks, e.g. timesteps within the table, still run: they read data) and take the memo's backend.
#   signature (op, forced backend, per argument) -> backend name; cleared whole when it reaches MEMO_LIMIT.
MEMO_LIMIT = 4096
_SELECTED: dict[tuple, str] = {}
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def forget_selections() -> None:
    """Empty the per-signature memo (a kernel or backend registered, the environment asked again; tests that
    patch a backend's reasons call it too)."""
    _SELECTED.clear()


def _signature(op: str, args: tuple, options: dict) -> tuple | None:
    """The memo key of a call, or None when the call must not be memoized (a tensor subclass: FakeTensor,
    DTensor, ... whose metadata may not be what the checks saw). Every argument's type is in it (True == 1 ==
    1.0 as keys, but only one of them may be valid), then per tensor its metadata, per other argument its value."""
    key = [op, _forced.get() or os.environ.get(ENV_VAR), *options.items(), tuple(map(type, args))]
    for a in args:
        if isinstance(a, torch.Tensor):
            if type(a) not in _PLAIN_TENSORS:
                return None
            key.append((a.dtype, a.shape, a.stride(), a.device, a.requires_grad))
        else:
            key.append(a)
    return tuple(key)


def call_memoized(op: str, build: Callable[..., object], *args, **options):
    """Run `op` on `build(*args, **options)` (its problem builder, whose keyword `validate` turns its metadata
    checks on and off) through the per-signature memo above: validated in full and ranked the first time a
    signature is seen, the record built with validate=False and the memo's backend after that."""
    key = _signature(op, args, options)
    try:
        name = _SELECTED.get(key) if key is not None else None
    except TypeError:           # an unhashable argument (a list): no memo for this call
        key = name = None
    if name is not None and op in _BACKENDS[name].kernels:
        return _run(op, name, build(*args, validate=False, **options))
    problem = build(*args, **options)
    name = select(op, problem)
    if key is not None:
        if len(_SELECTED) >= MEMO_LIMIT:
            _SELECTED.clear()
        _SELECTED[key] = name
    return _run(op, name, problem)


# --------------------------------------------------------------------------- explain

@dataclass
class Decision:
    """One dispatched op of an explained call: every backend's reasons ([] = could run it), in auto's order
    for this problem, what auto would take, and what ran (differs from `auto` inside mmkern.backend(...))."""
    op: str
    problem: object
    verdicts: dict[str, list[str]]
    auto: str | None
    ran: str

    def __str__(self) -> str:
        lines = [f"{self.op}: ran on {self.ran}; auto takes {self.auto or 'nothing'}"]
        for name, reasons in self.verdicts.items():
            mark = "*" if name == self.auto else " "
            lines.append(f"  {mark} {name:<10} " + ("can run it" if not reasons else "; ".join(reasons)))
        return "\n".join(lines)


class Explanation(dispatch_log):
    """What `explain` returns: `decisions` (one Decision per dispatched op) and `result` (the call's value)."""

    def __init__(self):
        super().__init__()
        self.decisions: list[Decision] = []
        self.result = None

    def record(self, op: str, name: str, problem) -> None:
        super().record(op, name, problem)
        order = [n for n in auto_order(op, problem) if n in _BACKENDS]
        verdicts = {n: not_supported_reasons(op, n, problem) for n in order}
        auto = next((n for n, reasons in verdicts.items() if not reasons), None)
        self.decisions.append(Decision(op, problem, verdicts, auto, name))

    def __str__(self) -> str:
        return "\n".join(str(d) for d in self.decisions) or "no mmkern op ran"


def explain(fn: Callable, *args, **kwargs) -> Explanation:
    """Runs fn(*args, **kwargs) once and says, for every mmkern op it dispatched, what each backend would do
    with those inputs and why, and which backend auto takes:

        print(mmkern.explain(mmkern.flash_attn_func, q, k, v, causal=True))
    """
    with Explanation() as explanation:
        explanation.result = fn(*args, **kwargs)
    return explanation
