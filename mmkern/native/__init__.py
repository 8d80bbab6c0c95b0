"""The `cpu` and `cuda` backends: the C++ / CUDA kernels of the compiled extension mmkern._C.

mmkern._C is built from csrc/ by `mmkern build` (see mmkern/build/); loading it registers its
ops with the torch dispatcher as torch.ops.mmkern_C.* (CPU kernels always, CUDA kernels when the
build had nvcc). Nothing here raises at `import mmkern`: the extension is loaded the first time
a backend asks, and a missing, stale or broken build becomes a *reason* (`extension_reasons()`,
shown by `mmkern info`), never an exception.

Registration is lazy, as for the triton backend: KERNELS names, per op, the module of
mmkern/native/ holding its adapter and the adapter's `run(problem)` and `reasons(problem)`;
the module is imported the first time the dispatcher asks about the op. The norm and diffusion adapters
serve both backends (the tensors' device picks the dispatcher key); attention has one adapter per backend
(BACKEND_KERNELS: attention.py for the CUDA kernels, attention_cpu.py for the C++ CPU kernels; rotary.py, the
C++ CPU rotary embedding, has no CUDA twin: on a GPU the triton backend's kernel runs it).

Helpers for adapter modules:
    cpp_op(name)               the torch.ops.mmkern_C op (loads the extension)
    missing_op_reasons(*names, device=None)
                               reasons (not exceptions) when the loaded build lacks an op, or lacks
                               its kernel for a device type ("cpu"/"cuda")

The C++ CPU kernels recycle their output buffers (csrc/common/cpu_output.h: freed outputs are kept, up to
MMKERN_CPU_OUTPUT_CACHE_MIB, default 1024, and reused already mapped instead of paying a page fault per 4 KiB
again): `cpu_output_cache()` says what it holds, `release_cpu_output_cache()` gives it back to the system.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import threading

from mmkern.dispatch import LazyFunction, forget_environment, register_kernel, register_lazy

# op -> (module of mmkern/native/, run function, reasons function): the same adapter for both backends
KERNELS = {
    "norm_residual_forward": ("norm", "norm_forward", "norm_forward_reasons"),
    "norm_residual_backward": ("norm", "norm_backward", "norm_backward_reasons"),
    "add_noise": ("diffusion", "add_noise", "reasons"),
    "get_velocity": ("diffusion", "get_velocity", "reasons"),
    "diffusion_loss": ("diffusion", "diffusion_loss", "reasons"),
    "diffusion_loss_backward": ("diffusion", "diffusion_loss_backward", "reasons"),
    "ddpm_step": ("diffusion", "ddpm_step", "reasons"),
    "ddim_step": ("diffusion", "ddim_step", "reasons"),
    "euler_step": ("diffusion", "euler_step", "reasons"),
    "euler_scale_model_input": ("diffusion", "euler_scale_model_input", "reasons"),
    "euler_add_noise": ("diffusion", "euler_add_noise", "reasons"),
}
# ops whose adapter differs per backend: attention has separate CUDA and C++ CPU kernels
BACKEND_KERNELS = {
    "cuda": {"attention_forward": ("attention", "attention_forward", "forward_reasons"),
             "attention_backward": ("attention", "attention_backward", "backward_reasons")},
    "cpu": {"attention_forward": ("attention_cpu", "attention_forward", "forward_reasons"),
            "attention_backward": ("attention_cpu", "attention_backward", "backward_reasons"),
            "rotary_embedding": ("rotary", "rotary_embedding", "rotary_embedding_reasons")},
}
BACKENDS = ("cpu", "cuda")
NAMESPACE = "mmkern_C"

_lock = threading.Lock()
_state: dict = {}      # "module" (the loaded extension) or "reason" (why it is unusable)


# --------------------------------------------------------------------------- loading

def find_build():
    """(directory, .so path) of the first built extension found (mmkern/build/paths.py:candidate_dirs), or None."""
    from mmkern.build.paths import candidate_dirs, so_name

    for directory in candidate_dirs():
        path = directory / so_name()
        if path.is_file():
            return directory, path
    return None


def _load():
    from mmkern.build.stamp import read_stamp, stale_reason

    found = find_build()
    if found is None:
        return None, ("the compiled extension mmkern._C is not built in this install (run `mmkern build`; "
                      "from a checkout: pip install -e . && mmkern build)")
    directory, path = found
    stale = stale_reason(read_stamp(directory))
    if stale is not None:
        return None, f"the build of mmkern._C at {path} is stale: {stale}; run `mmkern build`"
    if "mmkern._C" in sys.modules:
        return sys.modules["mmkern._C"], None
    try:
        import torch  # noqa: F401  (the extension links against libtorch: load it first)
        loader = importlib.machinery.ExtensionFileLoader("mmkern._C", str(path))
        spec = importlib.util.spec_from_file_location("mmkern._C", str(path), loader=loader)
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
    except Exception as exc:  # a broken build must not break `import mmkern`
        return None, f"the compiled extension mmkern._C at {path} failed to load: {exc.__class__.__name__}: {exc}"
    sys.modules["mmkern._C"] = module
    return module, None


def load():
    """The loaded extension module mmkern._C; RuntimeError with the reason when it cannot load."""
    module, reason = _loaded()
    if module is None:
        raise RuntimeError(reason)
    return module


def _loaded():
    with _lock:
        if "module" not in _state and "reason" not in _state:
            module, reason = _load()
            if module is not None:
                _state["module"] = module
            else:
                _state["reason"] = reason
        return _state.get("module"), _state.get("reason")


def reset() -> None:
    """Forget a failed load (after a build). A loaded .so stays loaded: a rebuilt one needs a new process."""
    with _lock:
        _state.pop("reason", None)
    forget_environment()


def extension_reasons() -> list[str]:
    """[] when mmkern._C is loaded and current, else the reason it is unusable."""
    _, reason = _loaded()
    return [] if reason is None else [reason]


def stamp() -> dict | None:
    """The build stamp of the loaded (or found) extension: torch version, CUDA archs, ptxas report."""
    from mmkern.build.stamp import read_stamp

    found = find_build()
    return None if found is None else read_stamp(found[0])


def _loaded_stamp() -> dict:
    """The stamp of the loaded build, read once: a loaded .so does not change (the dispatcher asks per call)."""
    with _lock:
        if "stamp" not in _state:
            _state["stamp"] = stamp() or {}
        return _state["stamp"]


def cuda_reasons() -> list[str]:
    """Extra reasons for the cuda backend: a build without CUDA kernels."""
    if extension_reasons():
        return []
    info = _loaded_stamp()
    if not info.get("with_cuda"):
        why = info.get("no_cuda_reason") or "unknown reason"
        return [f"mmkern._C was built without CUDA kernels ({why}); rebuild with nvcc and a CUDA build of torch"]
    return []


# --------------------------------------------------------------------------- helpers for adapters

def op_names() -> list[str]:
    """Names of the ops the loaded build registered in torch.ops.mmkern_C."""
    import torch

    if extension_reasons():
        return []
    prefix = NAMESPACE + "::"
    return sorted({s.name[len(prefix):] for s in torch._C._jit_get_all_schemas() if s.name.startswith(prefix)})


def cpp_op(name: str):
    """torch.ops.mmkern_C.<name> (loads the extension; RuntimeError with the reason when it cannot)."""
    import torch

    load()
    return getattr(getattr(torch.ops, NAMESPACE), name)


def missing_op_reasons(*names: str, device=None) -> list[str]:
    """Reasons the loaded build cannot serve these ops: not loadable, an op missing (an older
    build), or (device given) no kernel for that device type (a CPU-only build and CUDA tensors)."""
    import torch

    reasons = extension_reasons()
    if reasons:
        return reasons
    device_type = None if device is None else torch.device(device).type
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    for name in names:
        qualified = f"{NAMESPACE}::{name}"
        try:
            getattr(getattr(torch.ops, NAMESPACE), name)
        except (AttributeError, RuntimeError):
            reasons.append(f"mmkern._C was built without {qualified}; run `mmkern build`")
            continue
        if key is not None and not torch._C._dispatch_has_kernel_for_dispatch_key(qualified, key):
            if key == "CUDA":
                reasons.append(f"mmkern._C was built without CUDA kernels for {qualified} (a CPU-only build); "
                               f"run `mmkern build` with nvcc and a CUDA build of torch")
            else:
                reasons.append(f"mmkern._C has no {key} kernel for {qualified}")
    return reasons


# --------------------------------------------------------------------------- registration

for _backend in BACKENDS:
    register_lazy(_backend, "mmkern.native", {**KERNELS, **BACKEND_KERNELS[_backend]})
# the KV-cache append of flash_attn_with_kvcache is one indexed copy: the cpu backend takes torch's (as triton does)
register_kernel("kvcache_append", "cpu", LazyFunction("mmkern.torch_backend.kvcache", "kvcache_append"),
                LazyFunction("mmkern.torch_backend.kvcache", "kvcache_append_reasons"))


def cpu_output_cache(limit_mib: int | None = None) -> dict:
    """What the C++ CPU kernels' output cache holds: {"held_bytes", "held_buffers", "reuses", "fresh",
    "limit_mib"} (reuses / fresh: outputs of at least 64 KiB served from it / newly allocated, since the process
    started). limit_mib sets the most it may hold first (0: none, every output freshly allocated; what is held
    above the new limit is freed); the default comes from MMKERN_CPU_OUTPUT_CACHE_MIB (1024 when unset)."""
    if limit_mib is not None and (isinstance(limit_mib, bool) or not isinstance(limit_mib, int) or limit_mib < 0):
        raise ValueError(f"mmkern.native.cpu_output_cache: limit_mib must be an int >= 0 or None; got {limit_mib!r}")
    held_bytes, held_buffers, reuses, fresh, limit = cpp_op("cpu_output_cache")(False, -1 if limit_mib is None
                                                                                 else limit_mib)
    return {"held_bytes": held_bytes, "held_buffers": held_buffers, "reuses": reuses, "fresh": fresh,
            "limit_mib": limit}


def release_cpu_output_cache() -> int:
    """Frees the output buffers the C++ CPU kernels hold for reuse (as torch.cuda.empty_cache does for CUDA
    memory); returns the bytes released. Outputs still alive are not touched."""
    held = cpu_output_cache()["held_bytes"]
    cpp_op("cpu_output_cache")(True, -1)
    return held
