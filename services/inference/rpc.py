"""llama.cpp's RPC backend through ctypes: serve this host's CPU as a shard, or load a model across shards.

A coordinator holds the model's layers on RPC devices (one per shard server); each token's activations
travel shard to shard over TCP. No Ray or NATS here: `shard.py` runs servers, `engine.py` loads models.

The RPC protocol has no authentication and no encryption (llama.cpp: "never run the RPC server on an
open network"), so a server binds one configured cluster address, never every interface by default.
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import re
import socket
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from shared.errors import BadRequest, Internal, Unavailable

log = logging.getLogger("magi.inference.rpc")

_CPU_DEVICE = 0  # enum ggml_backend_dev_type: GGML_BACKEND_DEVICE_TYPE_CPU
_ANY_ADDRESSES = {"", "0.0.0.0", "::"}

# Every ctypes declaration of this module: name -> (argtypes, restype). Symbols of libggml-base
# resolve through libggml's handle, which depends on it.
_SIGNATURES: dict[str, tuple[list, Any]] = {
    "ggml_backend_load_all": ([], None),
    "ggml_backend_reg_by_name": ([ctypes.c_char_p], ctypes.c_void_p),
    "ggml_backend_reg_get_proc_address": ([ctypes.c_void_p, ctypes.c_char_p], ctypes.c_void_p),
    "ggml_backend_reg_dev_count": ([ctypes.c_void_p], ctypes.c_size_t),
    "ggml_backend_reg_dev_get": ([ctypes.c_void_p, ctypes.c_size_t], ctypes.c_void_p),
    "ggml_backend_dev_by_type": ([ctypes.c_int], ctypes.c_void_p),
    "ggml_backend_dev_name": ([ctypes.c_void_p], ctypes.c_char_p),
    "ggml_backend_dev_description": ([ctypes.c_void_p], ctypes.c_char_p),
    "ggml_backend_dev_memory": (
        [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)], None),
}
# Reached through ggml_backend_reg_get_proc_address (ggml-rpc.h, protocol v7). CFUNCTYPE calls
# release the GIL, so a server blocking in start() leaves the rest of the process running.
_START_SERVER = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t,
                                 ctypes.POINTER(ctypes.c_void_p))
_ADD_SERVER = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)

_lock = threading.Lock()
_ggml: ctypes.CDLL | None = None
_servers: dict[str, list[int]] = {}  # endpoint -> device handles, one add_server per process


def _lib() -> ctypes.CDLL:
    global _ggml
    if _ggml is None:
        import llama_cpp  # loads libllama and the ggml libraries it links, so this handle is the same copy

        folder = Path(llama_cpp.__file__).parent / "lib"
        found = [p for p in (folder / "libggml.so", folder / "libggml.dylib") if p.exists()]
        if not found or not llama_cpp.llama_supports_rpc():
            raise Unavailable("llama-cpp-python was built without the RPC backend (CMAKE_ARGS=-DGGML_RPC=ON)")
        lib = ctypes.CDLL(str(found[0]))
        for name, (argtypes, restype) in _SIGNATURES.items():
            getattr(lib, name).argtypes, getattr(lib, name).restype = argtypes, restype
        lib.ggml_backend_load_all()
        _ggml = lib
    return _ggml


def _rpc_proc(name: bytes, prototype):
    lib = _lib()
    reg = lib.ggml_backend_reg_by_name(b"RPC")
    address = lib.ggml_backend_reg_get_proc_address(reg, name) if reg else None
    if not address:
        raise Unavailable(f"this llama.cpp build has no {name.decode()} (RPC backend missing or too old)")
    return prototype(address)


# --- addresses -------------------------------------------------------------------------------------

def parse_endpoint(endpoint: str, field: str = "rpc_servers") -> tuple[str, int]:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BadRequest(f"RPC endpoint {endpoint!r} is not host:port", field=field)
    return host, int(port)


def bind_host(host: str, allow_any_address: bool = False) -> str:
    """The IPv4 address a shard server may bind: a specific one, or every interface only when allowed.

    llama.cpp's server takes a dotted IPv4 address only, so a name is resolved here first.
    """
    host = host.strip()
    if host in _ANY_ADDRESSES:
        if not allow_any_address:
            raise BadRequest(f"refusing to bind the RPC server to {host or 'an empty address'!r}: it has no "
                             "authentication; give this node's cluster address (or allow any address)",
                             field="rpc_host")
        log.warning("RPC server listens on every interface; keep this node off untrusted networks")
        return "0.0.0.0"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        try:
            address = ipaddress.ip_address(socket.getaddrinfo(host, None, socket.AF_INET)[0][4][0])
        except (OSError, IndexError):
            raise BadRequest(f"RPC host {host!r} is not an IPv4 address or resolvable name", field="rpc_host") from None
    if address.version != 4:
        raise BadRequest(f"RPC host {host!r}: llama.cpp's RPC server binds IPv4 addresses only", field="rpc_host")
    if address.is_unspecified and not allow_any_address:
        raise BadRequest(f"refusing to bind the RPC server to {host!r} (every interface)", field="rpc_host")
    if address.is_global and not allow_any_address:
        raise BadRequest(f"refusing to bind the RPC server to the public address {host!r}: use a private "
                         "cluster network (or allow any address)", field="rpc_host")
    return str(address)


def is_listening(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# --- shard side ------------------------------------------------------------------------------------

def start_rpc_server(endpoint: str, n_threads: int, cache_dir: str | None = None,
                     allow_any_address: bool = False) -> None:
    """Serve this host's CPU on `endpoint` ("host:port"); blocks for as long as the server runs.

    llama.cpp serves one coordinator connection at a time and returns only when it cannot listen.
    """
    host, port = parse_endpoint(endpoint, field="rpc_host")
    host = bind_host(host, allow_any_address)
    if cache_dir:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
    start = _rpc_proc(b"ggml_backend_rpc_start_server", _START_SERVER)
    cpu = _lib().ggml_backend_dev_by_type(_CPU_DEVICE)
    if not cpu:
        raise Internal("ggml has no CPU device to serve")
    devices = (ctypes.c_void_p * 1)(cpu)
    log.info("rpc server starting", extra={"endpoint": f"{host}:{port}", "threads": n_threads})
    start(f"{host}:{port}".encode(), cache_dir.encode() if cache_dir else None, max(1, n_threads), 1, devices)
    raise Unavailable(f"RPC server could not listen on {host}:{port} (port in use or address not on this host)")


# --- coordinator side ------------------------------------------------------------------------------

def add_rpc_devices(endpoints: list[str]) -> list[ctypes.c_void_p]:
    """Device handles of the given shard servers, in order; each server is added once per process.

    The servers are not registered in ggml's global device list on purpose: a model loaded later in
    this process without explicit devices would otherwise pick the shards up as well.
    """
    if not endpoints:
        raise BadRequest("no RPC servers given", field="rpc_servers")
    if len(set(endpoints)) != len(endpoints):
        raise BadRequest(f"RPC servers listed twice: {endpoints}", field="rpc_servers")
    with _lock:
        devices: list[ctypes.c_void_p] = []
        for endpoint in endpoints:
            if endpoint not in _servers:
                _servers[endpoint] = _add_server(endpoint)
            devices.extend(ctypes.c_void_p(handle) for handle in _servers[endpoint])
        return devices


def _add_server(endpoint: str) -> list[int]:
    host, port = parse_endpoint(endpoint)
    # llama.cpp aborts the whole process when it cannot connect, so check first.
    if not is_listening(host, port, timeout=2.0):
        raise Unavailable(f"RPC server {endpoint} is not reachable", field="rpc_servers")
    reg = _rpc_proc(b"ggml_backend_rpc_add_server", _ADD_SERVER)(endpoint.encode())
    lib = _lib()
    count = lib.ggml_backend_reg_dev_count(reg) if reg else 0
    if not count:
        raise Unavailable(f"RPC server {endpoint} offers no device", field="rpc_servers")
    return [lib.ggml_backend_reg_dev_get(reg, i) for i in range(count)]


def device_name(device) -> str:
    return (_lib().ggml_backend_dev_name(device) or b"").decode()


def device_endpoint(device) -> str:
    return (_lib().ggml_backend_dev_description(device) or b"").decode()


def free_memory(device) -> int:
    free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
    _lib().ggml_backend_dev_memory(device, ctypes.byref(free), ctypes.byref(total))
    return free.value


def tensor_split_for(devices: list) -> list[float]:
    """Each device's share of the layers, in proportion to its free memory (even when unknown)."""
    free = [free_memory(d) for d in devices]
    if not free or min(free) <= 0:
        return [1.0 / len(devices)] * len(devices) if devices else []
    return [f / sum(free) for f in free]


def devices_array(devices: list) -> ctypes.Array:
    """The NULL-terminated `ggml_backend_dev_t *` that `llama_model_params.devices` expects."""
    return (ctypes.c_void_p * (len(devices) + 1))(*[ctypes.c_void_p(_handle(d)) for d in devices], None)


def _handle(device) -> int:
    return device.value if isinstance(device, ctypes.c_void_p) else int(device)


# --- loading a model on shards ----------------------------------------------------------------------

_LAYER_LINE = re.compile(r"layer\s+(\d+) assigned to device (\S+?),")


@contextmanager
def _model_on_devices(devices: list) -> Iterator[list[str]]:
    """While open, models built by `llama_cpp.Llama` use `devices`, and llama.cpp's log is collected.

    llama-cpp-python 0.3.36's `Llama` takes no devices argument and loads the model inside __init__
    from `llama_cpp.llama_model_default_params()`, so that function is wrapped for the duration (under
    a lock: it is process-wide, as is llama.cpp's log callback). The log tells where layers went.
    """
    import llama_cpp.llama_cpp as api

    array = devices_array(devices)  # referenced until the load has copied it
    lines: list[str] = []

    def default_params():
        params = original()
        params.devices = ctypes.cast(array, ctypes.c_void_p).value
        return params

    @api.llama_log_callback
    def collect(level, text, _user_data):
        lines.append(text.decode(errors="replace"))
        if level in (3, 4):  # ggml.h: GGML_LOG_LEVEL_WARN = 3, GGML_LOG_LEVEL_ERROR = 4
            log.warning("llama.cpp: %s", text.decode(errors="replace").rstrip())

    with _lock:
        original = api.llama_model_default_params
        previous, user_data = api.llama_log_callback(), ctypes.c_void_p()
        api.llama_log_get(ctypes.byref(previous), ctypes.byref(user_data))
        api.llama_model_default_params = default_params
        api.llama_log_set(collect, None)
        try:
            yield lines
        finally:
            api.llama_model_default_params = original
            api.llama_log_set(previous, user_data)


def layers_per_endpoint(load_log: list[str], devices: list) -> dict[str, int]:
    """How many layers each shard got, from llama.cpp's load log; raises if any stayed on this host."""
    endpoints = {device_name(d): device_endpoint(d) for d in devices}
    counts = dict.fromkeys(endpoints.values(), 0)
    elsewhere = []
    for match in _LAYER_LINE.finditer("".join(load_log)):
        layer, name = int(match.group(1)), match.group(2)
        if name in endpoints:
            counts[endpoints[name]] += 1
        else:
            elsewhere.append(f"{layer}:{name}")
    if elsewhere or not sum(counts.values()):
        raise Internal(f"model layers were not placed on the RPC shards (elsewhere: {', '.join(elsewhere) or 'all'})")
    return counts


def load_on_shards(factory: Callable[..., Any], endpoints: list[str], **llama_kwargs) -> tuple[Any, dict[str, int]]:
    """Build a model with `factory` (`llama_cpp.Llama` or a subclass) with every layer on the shards.

    Returns the model and the layers per shard endpoint. Layers split by the shards' free memory.
    """
    devices = add_rpc_devices(endpoints)
    split = tensor_split_for(devices)
    # -1: every layer, and the output layer, goes to the listed devices; none stays on this host.
    llama_kwargs.update(n_gpu_layers=-1, tensor_split=split)
    with _model_on_devices(devices) as load_log:
        try:
            model = factory(**llama_kwargs)
        except ValueError as exc:  # llama-cpp-python's "Failed to load model from file"
            detail = "".join(load_log[-5:]).strip()
            raise Unavailable(f"loading the model on RPC shards {', '.join(endpoints)} failed: {exc}; "
                              f"llama.cpp said: {detail}", field="rpc_servers") from None
    try:
        placement = layers_per_endpoint(load_log, devices)
    except Internal:
        model.close()
        raise
    log.info("model loaded on rpc shards", extra={"layers": placement, "split": [round(s, 3) for s in split]})
    return model, placement
