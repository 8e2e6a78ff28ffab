"""What the trainer's model loading would refuse, checked from the files alone (no torch,
no transformers import on the common path): the architecture is known, config.json parses,
the weights exist, their safetensors headers are whole and their shapes fit the config."""

from __future__ import annotations

import importlib.util
import json
import re
import struct
from pathlib import Path

from hpctrain.launcher.contract.errors import UserError
from hpctrain.launcher.contract.pickles import unsafe_weight_files

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
TORCH_BIN, TORCH_BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
_EMBEDDING = re.compile(r"(^|\.)(embed_tokens|word_embeddings|wte|embed_in|tok_embeddings)\.weight$")
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")


def _mapping_file_types() -> set[str] | None:
    """Model types from transformers' own mapping file, read without importing transformers
    (`auto_mappings.py` holds plain literals; importing the package costs seconds)."""
    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / "auto" / "auto_mappings.py"
    if not path.is_file():
        return None
    loader = importlib.util.spec_from_file_location("_hpctrain_auto_mappings", path)
    module = importlib.util.module_from_spec(loader)
    try:
        loader.loader.exec_module(module)
        return set(module.CONFIG_MAPPING_NAMES)
    except Exception:  # another transformers layout: ask transformers itself
        return None


def known_model_type(model_type: str) -> bool:
    fast = _mapping_file_types()
    if fast is not None and model_type in fast:
        return True
    from transformers import CONFIG_MAPPING  # the slow, authoritative answer (rare types, errors)

    return model_type in CONFIG_MAPPING


def _known_types_hint(model_type: str) -> str:
    import difflib

    names = sorted(_mapping_file_types() or [])
    close = difflib.get_close_matches(model_type, names, n=3)
    return f"did you mean {' or '.join(repr(c) for c in close)}?" if close else "e.g. llama, bert, gpt2, qwen2"


def check_model_type(model_type, where: str, file: str | None) -> UserError | None:
    if not isinstance(model_type, str) or not model_type:
        return UserError("no model_type", file=file, field=where, expected="an architecture transformers knows")
    if known_model_type(model_type):
        return None
    return UserError(f"model_type '{model_type}' is not an architecture transformers knows", file=file,
                     field=where, hint=_known_types_hint(model_type))


def safetensors_header(path: Path) -> dict[str, list[int]]:
    """{tensor name: shape} from a safetensors file's header; a cut or foreign file is a UserError."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"its header claims {n:,} bytes, the file has {size:,}")
            header = json.loads(f.read(n))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise UserError(f"not a readable safetensors file ({e})", file=str(path), field="model.path") from None
    if 8 + n + end > size:
        raise UserError(f"truncated: {size:,} bytes on disk, its header describes {8 + n + end:,}",
                        file=str(path), field="model.path", expected="a complete copy of the weights")
    return {k: list(t["shape"]) for k, t in header.items() if k != "__metadata__"}


def weight_shapes(model_dir: Path) -> dict[str, list[int]] | None:
    """Every tensor's shape from the safetensors headers; None for PyTorch .bin weights (their
    shapes need torch); UserError when no weights are there or an index names a missing shard."""
    if (model_dir / SAFETENSORS).is_file():
        return safetensors_header(model_dir / SAFETENSORS)
    for index_name in (SAFETENSORS_INDEX, TORCH_BIN_INDEX):
        index = model_dir / index_name
        if not index.is_file():
            continue
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"not a weight index ({e})", file=str(index), field="model.path") from None
        missing = [s for s in shards if not (model_dir / s).is_file()]
        if missing:
            raise UserError(f"{len(missing)} shard(s) the index names are missing: {', '.join(missing[:3])}",
                            file=str(index), field="model.path", expected="every shard next to the index")
        if index_name == TORCH_BIN_INDEX:
            return None
        shapes: dict[str, list[int]] = {}
        for s in shards:
            shapes.update(safetensors_header(model_dir / s))
        return shapes
    if (model_dir / TORCH_BIN).is_file():
        return None
    raise UserError("config.json but no weights", file=str(model_dir), field="model.path",
                    expected=f"{SAFETENSORS}, {SAFETENSORS_INDEX} with its shards, or {TORCH_BIN}")


def shape_problems(config: dict, shapes: dict[str, list[int]]) -> list[str]:
    """Where the weights contradict the config: the embedding (vocab x hidden) and the layers."""
    out = []
    vocab = config.get("vocab_size")
    hidden = config.get("embedding_size") or config.get("hidden_size") or config.get("n_embd") or config.get("d_model")
    emb = next(((k, v) for k, v in sorted(shapes.items()) if _EMBEDDING.search(k) and len(v) == 2), None)
    if emb is not None:
        name, (rows, cols) = emb
        if vocab is not None and rows != vocab:
            out.append(f"{name} has {rows:,} rows but config.json says vocab_size {vocab:,}")
        if hidden is not None and cols != hidden:
            out.append(f"{name} is {cols:,} wide but config.json says hidden size {hidden:,}")
    layers = config.get("num_hidden_layers") or config.get("n_layer") or config.get("num_layers")
    found = {int(m.group(1)) for k in shapes if (m := _LAYER.search(k))}
    if layers is not None and found and max(found) + 1 != layers:
        out.append(f"the weights hold {max(found) + 1} layers but config.json says {layers}")
    return out


def model_dir_problems(model_dir: Path, file: str | None) -> list[UserError]:
    """Everything about `model.path` that would stop the trainer's `from_pretrained`."""
    cfg_path = model_dir / "config.json"
    try:
        config = json.loads(cfg_path.read_text())
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        return [UserError(f"config.json does not parse ({e})", file=str(cfg_path), field="model.path")]
    errors = []
    bad_type = check_model_type(config.get("model_type"), "model_type", str(cfg_path))
    if bad_type is not None:
        errors.append(bad_type)
    errors += [UserError(f"refused: {why}", file=str(f), field="model.path",
                         expected="safetensors weights, or PyTorch weights holding tensors only")
               for f, why in unsafe_weight_files(model_dir)]
    try:
        shapes = weight_shapes(model_dir)
    except UserError as e:
        return [*errors, e]
    if shapes is not None:
        errors += [UserError(p, file=str(model_dir), field="model.path",
                             expected="weights saved with this config.json") for p in shape_problems(config, shapes)]
    return errors
