"""Dataset files from the Hugging Face hub, through the local hub cache. Offline, this fails within seconds with a
message that says how to download the files elsewhere and point the recipe at them."""

from __future__ import annotations

from pathlib import Path

from daytune.errors import DataError

HUB_TIMEOUT_S = 10.0


def fetch_dataset(hub_id: str, patterns: list[str], revision: str | None = None) -> Path:
    """A local snapshot folder holding the files of dataset `hub_id` that match `patterns`."""
    from huggingface_hub import snapshot_download

    kwargs = dict(repo_id=hub_id, repo_type="dataset", revision=revision, allow_patterns=patterns or None)
    try:  # the cache first: no network when the files are already here
        return Path(snapshot_download(local_files_only=True, **kwargs))
    except Exception:
        pass
    try:
        return Path(snapshot_download(etag_timeout=HUB_TIMEOUT_S, **kwargs))
    except Exception as e:  # offline, gated, unknown id, no matching file
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        files = " ".join(f"--include '{p}'" for p in patterns)
        raise DataError(
            f"cannot fetch dataset '{hub_id}' from the Hugging Face hub ({type(e).__name__}: {reason}). "
            f"If this machine is offline, download it elsewhere (`huggingface-cli download {hub_id} "
            f"--repo-type dataset {files} --local-dir DIR`), copy DIR here and give `path: DIR` instead of `hub:`."
        ) from None
