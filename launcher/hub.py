"""Hub model ids pinned where `run`, `submit` and `validate` run, never on a compute node.

A spec may name a model on the Hugging Face Hub instead of a folder: `model.path: org/name`, or
`org/name@revision` (a branch, tag or commit). Compute nodes are often offline, a branch moves
while a run waits in the queue, and a requeue days later must load the same weights. So the
machine that launches the run resolves the revision to its commit sha, downloads that snapshot
into the cache (`model.hub_cache`, else `HF_HUB_CACHE` / `HF_HOME`), and the frozen spec holds
the snapshot's folder in place of the id, with `hub.<field>: {id, revision, sha}` beside it.
The ranks load a local folder with `HF_HUB_OFFLINE=1`; every requeue reads the frozen spec; a
later launch of the same run dir reuses the recorded sha rather than asking the Hub again, and
every stage of a pipeline that names the same id gets the same sha.

What goes wrong here is the user's to fix and is said in one line before anything is queued
(exit 2): an id the Hub does not have, a revision it does not have, a gated model without a
token, a Hub that cannot be reached. A full commit sha already in the cache needs no Hub.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from hpctrain.launcher.contract.errors import UserError
from hpctrain.launcher.contract.paths import hub_id
from hpctrain.launcher.contract.rundir import RunDir
from hpctrain.launcher.contract.spec import HubPin, RunSpec, load_spec_dict, spec_from_dict

COMMIT = re.compile(r"[0-9a-f]{40}")
NETWORK_ERRORS = {"ConnectError", "ConnectTimeout", "TimeoutException", "ConnectionError", "Timeout"}
"""The HTTP client's no-answer errors by name (httpx in huggingface_hub 1 and later, requests before)."""


def hub_fields(spec: RunSpec) -> list[tuple[str, tuple[str, str]]]:
    """[(spec field, (repo id, revision))] of the fields that name a Hub model."""
    fields = [("model.path", spec.model.path), ("model.tokenizer", spec.model.tokenizer)]
    if spec.finetune is not None:
        fields += spec.finetune.other_models()
    return [(f, ref) for f, v in fields if (ref := hub_id(v)) is not None]


class Pinner:
    """Pins Hub ids for one command: each (id, revision) is resolved once, so every stage of a
    pipeline and every field naming it gets the same commit."""

    def __init__(self, file: str | None, log=print) -> None:
        self.file, self.log = file, log
        self.done: dict[tuple[str, str, str], tuple[str, str]] = {}  # (cache, id, revision) -> (sha, folder)

    def pin(self, spec: RunSpec) -> RunSpec:
        """`spec` with every Hub id replaced by its pinned snapshot folder and recorded in `hub`."""
        fields = hub_fields(spec)
        if not fields:
            return spec
        cache = str(Path(spec.model.hub_cache or _default_cache()).expanduser().resolve())
        before = _pinned_before(spec)
        data, pins = spec.model_dump(), dict(spec.hub)
        for field, (repo, revision) in fields:
            key = (cache, repo, revision)
            if key not in self.done:
                old = before.get(field)
                sha = old.sha if old and (old.id, old.revision) == (repo, revision) else None
                self.done[key] = self._fetch(field, repo, revision, sha, cache)
            sha, folder = self.done[key]
            _set(data, field, folder)
            pins[field] = HubPin(id=repo, revision=revision, sha=sha)
        data["hub"] = {k: v.model_dump() for k, v in pins.items()}
        return RunSpec.model_validate(data)

    def _fetch(self, field: str, repo: str, revision: str, sha: str | None, cache: str) -> tuple[str, str]:
        from huggingface_hub import snapshot_download

        where = f"{repo}@{revision}"
        with hub_errors(field, self.file, repo, revision):
            if sha is None:
                sha = revision if COMMIT.fullmatch(revision) else _resolve(repo, revision)
                self.log(f"{field}: {where} is commit {sha}")
            else:
                self.log(f"{field}: {where} stays at commit {sha} (pinned when this run dir was started)")
            folder = snapshot_download(repo_id=repo, revision=sha, cache_dir=cache)
        return sha, folder


def _resolve(repo: str, revision: str) -> str:
    from huggingface_hub import HfApi

    return HfApi().model_info(repo, revision=revision).sha


@contextlib.contextmanager
def hub_errors(field: str, file: str | None, repo: str, revision: str):
    """The Hub's answers that are the user's to fix, as one-line user errors naming the field."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    hub = constants.ENDPOINT
    try:
        yield
        return
    except GatedRepoError:
        msg, expected, hint = (f"{repo} is gated", "a model this account may download",
                               "accept its terms on the Hub and set HF_TOKEN where you submit")
    except RepositoryNotFoundError:
        msg, expected, hint = (f"no model {repo} on the Hub ({hub}), and no folder at that path",
                               "a Hub model id org/name or a local model folder",
                               "a private model needs HF_TOKEN where you submit")
    except RevisionNotFoundError:
        msg, expected, hint = f"{repo} has no revision '{revision}'", "a branch, tag or commit of the model", None
    except Exception as e:
        unreachable = isinstance(e, (OfflineModeIsEnabled, LocalEntryNotFoundError, ConnectionError, TimeoutError)) \
            or any(c.__name__ in NETWORK_ERRORS for c in type(e).__mro__)
        if not unreachable and isinstance(e, HfHubHTTPError):
            status = e.response.status_code if e.response is not None else "an error"
            raise UserError(f"the Hub ({hub}) answered {status} for {repo}@{revision}", file=file, field=field,
                            expected="a Hub that serves the model", hint="try again later") from None
        if not unreachable:
            raise
        msg = (("HF_HUB_OFFLINE=1 is set here, and " if constants.HF_HUB_OFFLINE else "")
               + f"cannot reach the Hub at {hub} to pin {repo}@{revision} (and no folder {repo} exists here)")
        expected = "a reachable Hub, or a local folder, or a full commit sha already in the cache"
        hint = "pin where the Hub is reachable (only the machine that runs submit needs it, not the compute nodes)"
    raise UserError(msg, file=file, field=field, expected=expected, hint=hint) from None


def _default_cache() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE


def _pinned_before(spec: RunSpec) -> dict[str, HubPin]:
    """The pins of the spec frozen in this run dir, if it was started before."""
    frozen = RunDir(spec.run_path).spec_file
    if not frozen.is_file():
        return {}
    try:
        return spec_from_dict(load_spec_dict(frozen), str(frozen)).hub
    except Exception:  # noqa: BLE001 - an unreadable frozen spec is refused by freeze_run_dir, not here
        return {}


def _set(data: dict, field: str, value: str) -> None:
    *parents, last = field.split(".")
    for p in parents:
        data = data[p]
    data[last] = value
