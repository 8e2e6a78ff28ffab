"""What a pickled file would call if it were loaded, read from its opcodes without loading it.
No torch.

A pickle runs code through the globals it names: `GLOBAL`/`STACK_GLOBAL`/`INST` import a
callable, and `REDUCE`/`NEWOBJ`/`BUILD` call it. A PyTorch file (`torch.save`: a zip whose
`*/data.pkl` is the pickle, or the legacy format: several pickles in a row) only needs the
callables that rebuild tensors, storages, dtypes and plain containers. `torch.load(...,
weights_only=True)` enforces that while loading; DeepSpeed loads its checkpoint files with
`weights_only=False` and PyTorch's distributed checkpoint reads its `.metadata` with plain
`pickle.load`, so every pickle we are about to load is checked here first, against the short
list of globals each format is known to hold.

The scan simulates the pickle machine's stack (strings, the memo, marks) far enough to know
which module and name each `STACK_GLOBAL` takes; a global it cannot resolve is refused.
"""

from __future__ import annotations

import io
import pickletools
import re
import zipfile
from pathlib import Path

__all__ = ["TENSOR_GLOBALS", "CHECKPOINT_GLOBALS", "pickle_globals", "unsafe_global", "pickled_files"]

ZIP_MAGIC = b"PK\x03\x04"

# torch.load(weights_only=True)'s own rebuilders, and the names that carry types
_TORCH_REBUILD = {
    "_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
    "_rebuild_parameter_with_state", "_rebuild_sparse_tensor", "_rebuild_nested_tensor",
    "_rebuild_meta_tensor_no_storage", "_rebuild_wrapper_subclass", "_rebuild_qtensor",
    "_rebuild_device_tensor_from_numpy",
}
_DTYPES = {
    "float16", "float32", "float64", "bfloat16", "half", "float", "double", "complex64", "complex128",
    "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool", "long", "int",
    "short", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "cfloat", "cdouble",
    "qint8", "quint8", "qint32",
}
_TORCH_TYPES = {"Size", "device", "dtype", "Tensor", "strided", "sparse_coo", "contiguous_format",
                "channels_last", "preserve_format"}
_STORAGE = re.compile(r"^[A-Za-z0-9]*Storage$")

TENSOR_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {("torch._utils", n) for n in _TORCH_REBUILD}
    | {("torch", n) for n in _DTYPES | _TORCH_TYPES}
    | {("torch._tensor", "_rebuild_from_type_v2"), ("torch.nn.parameter", "Parameter"),
       ("torch.storage", "UntypedStorage"), ("torch.storage", "TypedStorage"),
       ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
       ("builtins", "slice"), ("builtins", "complex"), ("builtins", "bytearray")}
)
"""What a file of tensors and plain containers may name (a model's weights, our own state)."""

CHECKPOINT_GLOBALS: frozenset[tuple[str, str]] = TENSOR_GLOBALS | frozenset({
    # DeepSpeed's model and optimizer states (ZeRO 1-3 and their universal conversion)
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.checkpoint.constants", "PARAM_SHAPES"),
    # PyTorch's distributed checkpoint (FSDP2): the `.metadata` record
    *{("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "StorageMeta")},
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),  # the checkpoint's own path
    ("torch.distributed.checkpoint.planner", "LoadItemType"),
    ("torch.distributed.checkpoint.planner", "WriteItemType"),
    ("torch.distributed.checkpoint._extension", "ExtensionRegistry"),
    ("torch.distributed.checkpoint._extension", "StreamTransformExtension"),
    ("torch.distributed.checkpoint._hf_utils", "_StorageInfo"),
})
"""What a checkpoint file of one of our engines may name: tensors, DeepSpeed's state records,
the distributed checkpoint's metadata."""

_STRING_OPS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE",
               "BINUNICODE8"}
_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}
_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}
_UNKNOWN = object()  # a stack value the scan does not track


def _one_pickle_globals(stream: io.BufferedIOBase) -> list[tuple[str, str]]:
    """The globals one pickle (read from `stream` up to its STOP) names, in order. A global whose
    name the scan cannot resolve is returned as ("?", "?"); a malformed pickle raises ValueError."""
    stack: list = []
    marks: list[int] = []
    memo: dict = {}
    out: list[tuple[str, str]] = []
    for op, arg, _pos in pickletools.genops(stream):
        name = op.name
        if name == "MARK":
            marks.append(len(stack))
            continue
        if name in ("GLOBAL", "INST"):
            module, _, attr = str(arg).partition(" ")
            out.append((module, attr))
        if name in ("EXT1", "EXT2", "EXT4"):  # globals by the copyreg registry's number: refused
            out.append(("?", "?"))
        before = op.stack_before
        if pickletools.markobject in before:
            if not marks:
                raise ValueError(f"{name} without a MARK")
            del stack[marks.pop():]
            popped_n = before.index(pickletools.markobject)
        else:
            popped_n = len(before)
        if popped_n > len(stack):
            raise ValueError(f"{name} on a stack of {len(stack)}")
        popped = stack[len(stack) - popped_n:] if popped_n else []
        del stack[len(stack) - popped_n:]
        if name == "STACK_GLOBAL":
            module, attr = popped
            ok = isinstance(module, str) and isinstance(attr, str)
            out.append((module, attr) if ok else ("?", "?"))
            stack.append(_UNKNOWN)
        elif name in _STRING_OPS:
            stack.append(arg if isinstance(arg, str) else arg.decode("latin-1") if isinstance(arg, bytes) else arg)
        elif name in _PUT_OPS:  # stores the top without popping it
            if not stack:
                raise ValueError(f"{name} on an empty stack")
            memo[arg] = stack[-1]
        elif name == "MEMOIZE":
            memo[len(memo)] = popped[0]
            stack.append(popped[0])
        elif name in _GET_OPS:
            stack.append(memo.get(arg, _UNKNOWN))
        elif name == "DUP":
            stack += [popped[0], popped[0]]
        else:
            stack += [_UNKNOWN] * len(op.stack_after)
    return out


def pickle_globals(path: Path) -> list[tuple[str, str]]:
    """Every global the pickles of a PyTorch or pickle file name (ValueError: not readable as one).

    A `torch.save` zip: each `*.pkl` member; the legacy torch format: its leading pickles (magic
    number, protocol, system info, the object, the storage keys); a plain pickle file: the first."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if head == ZIP_MAGIC:
        try:
            with zipfile.ZipFile(path) as z:
                members = [n for n in z.namelist() if n.endswith(".pkl")]
                if not members:
                    raise ValueError("a zip without a pickle in it")
                return [g for n in members for g in _one_pickle_globals(io.BytesIO(z.read(n)))]
        except zipfile.BadZipFile as e:
            raise ValueError(f"a damaged zip ({e})") from None
    out: list[tuple[str, str]] = []
    with open(path, "rb") as f:
        for i in range(5):
            start = f.tell()
            if not f.read(1):
                break
            f.seek(start)
            try:
                out += _one_pickle_globals(f)
            except ValueError:
                if i == 0:
                    raise
                break  # past the legacy format's pickles: raw storage bytes
            if i == 0 and not head.startswith(b"\x80\x02\x8a"):  # not torch's legacy magic number
                break
    return out


def unsafe_global(path: Path, allowed: frozenset[tuple[str, str]]) -> str | None:
    """Why loading `path` could run code: the first global outside `allowed` (or the reason the
    file is not a readable pickle), or None when it names only what `allowed` holds."""
    try:
        found = pickle_globals(path)
    except (ValueError, OSError, EOFError) as e:
        return f"is not a readable pickle ({e})"
    for module, attr in found:
        if (module, attr) == ("?", "?"):
            return "names a global the scan cannot resolve (refused)"
        if (module, attr) in allowed or (module in ("torch", "torch.storage") and _STORAGE.match(attr)):
            continue
        return f"would call {module}.{attr} when loaded (only tensors and plain containers are allowed)"
    return None


PICKLED_SUFFIXES = {".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt"}
DCP_METADATA = ".metadata"  # read with pickle.load by torch.distributed.checkpoint


def pickled_files(directory: Path) -> list[Path]:
    """The files under `directory` that a loader would unpickle, by their names: torch's and
    DeepSpeed's (.pt, .bin, ...) and the distributed checkpoint's `.metadata`. (Its `.distcp`
    shards hold raw tensor bytes, their objects loaded with weights_only=True by torch.)"""
    return [f for f in sorted(Path(directory).rglob("*"))
            if f.is_file() and (f.suffix in PICKLED_SUFFIXES or f.name == DCP_METADATA)]


def unsafe_weight_files(model_dir: Path) -> list[tuple[Path, str]]:
    """A model folder's pickled weights (pytorch_model.bin, its shards, *.pt) that name anything
    beyond tensors and plain containers, each with why: what `validate` and the model factory
    refuse before transformers unpickles them."""
    out = []
    for f in sorted(Path(model_dir).iterdir()):
        if f.is_file() and f.suffix in PICKLED_SUFFIXES:
            why = unsafe_global(f, TENSOR_GLOBALS)
            if why is not None:
                out.append((f, why))
    return out
