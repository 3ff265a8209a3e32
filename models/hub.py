"""Turn a model name into a local checkpoint folder: a local path, a preset, or a Hugging Face repo id.

Downloads go through huggingface_hub.snapshot_download, which itself honours HF_HOME (cache
location), HF_HUB_OFFLINE (cache only) and HF_TOKEN (gated/private repos). Only the files the
loader reads are fetched: safetensors weights, JSON configs, tokenizer files, chat templates.
Every failure a user can cause becomes one ModelLoadError sentence saying what to do.
"""

from __future__ import annotations

import os
import re

from .presets import PRESETS

ALLOW_PATTERNS = ["*.safetensors", "*.json", "tokenizer*", "*.jinja"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")  # the hub's names start alphanumeric


class ModelLoadError(ValueError):
    """A model could not be loaded for a reason the user can fix; the message says how."""


def resolve_checkpoint(name_or_path: str, allow_patterns=ALLOW_PATTERNS) -> str:
    """Local folder holding config.json and *.safetensors for `name_or_path` (downloading the files
    matching `allow_patterns` if needed)."""
    path = os.path.expanduser(str(name_or_path))
    if os.path.isdir(path):
        return path
    if name_or_path in PRESETS:
        repo = PRESETS[name_or_path]["hf_repo"]
    elif _REPO_ID.match(str(name_or_path)) and not os.path.exists(path):
        repo = name_or_path
    elif str(name_or_path).startswith((".", "/", "~")) and not os.path.exists(path):  # a path, not a name
        raise ModelLoadError(
            f"{name_or_path} does not exist; pass the folder that holds config.json and *.safetensors."
        )
    else:
        raise ModelLoadError(
            f"{name_or_path!r} is neither a local folder, a preset nor a Hugging Face repo id; "
            f"use a folder with config.json and *.safetensors, an 'org/name' repo id, or one of: {', '.join(PRESETS)}."
        )
    return download(repo, allow_patterns)


def cached_folder(repo: str, filename: str) -> str | None:
    """The snapshot folder of `repo` in the local Hugging Face cache (HF_HOME) that holds `filename`,
    or None when the cache does not hold it; never touches the network."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface-hub is a runtime dependency
        return None
    path = try_to_load_from_cache(repo, filename)  # a path, None, or a "known missing" marker
    return os.path.dirname(path) if isinstance(path, str) else None


def download(repo: str, allow_patterns=ALLOW_PATTERNS) -> str:
    """snapshot_download with the hub's exceptions turned into one-sentence ModelLoadErrors."""
    try:
        import huggingface_hub
        from huggingface_hub import errors
    except ImportError:  # pragma: no cover - huggingface-hub is a runtime dependency
        raise ModelLoadError(f"downloading {repo!r} needs huggingface-hub; pip install huggingface-hub.") from None
    try:
        return huggingface_hub.snapshot_download(
            repo_id=repo, allow_patterns=allow_patterns, token=os.environ.get("HF_TOKEN") or None
        )
    except errors.GatedRepoError:  # before RepositoryNotFoundError: it is a subclass
        raise ModelLoadError(
            f"{repo!r} is a gated model: accept its license on https://huggingface.co/{repo} "
            "and set HF_TOKEN to an access token of that account."
        ) from None
    except errors.RepositoryNotFoundError:
        raise ModelLoadError(
            f"{repo!r} was not found on the Hugging Face hub; check the spelling, or set HF_TOKEN if it is private."
        ) from None
    except errors.LocalEntryNotFoundError:
        where = os.environ.get("HF_HOME", "~/.cache/huggingface")
        raise ModelLoadError(
            f"{repo!r} is not in the local cache ({where}) and could not be downloaded (no network, or "
            "HF_HUB_OFFLINE=1); connect to the internet once, or pass a local folder."
        ) from None
    except Exception as e:  # HTTP errors, connection errors of the hub's HTTP client, disk errors
        raise ModelLoadError(
            f"downloading {repo!r} from the Hugging Face hub failed ({type(e).__name__}: {e}); "
            "check the network connection and try again."
        ) from None
