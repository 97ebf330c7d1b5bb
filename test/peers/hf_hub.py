"""Downloads models from papa-service with Hugging Face's own client (huggingface_hub).

Run by test/hf-hub.test.ts against a running service, on Debian's Python, with the unmodified
huggingface_hub source on PYTHONPATH. Prints one JSON object of what the client saw.
Environment: PAPA_URL, PAPA_API_KEY, MODEL (a model with versions 1 and 2, alias `production`
on version 1), SHARDED (a model whose latest version is sharded, with companion files).
"""

import hashlib
import json
import os
import tempfile

import huggingface_hub
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.utils import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

endpoint = os.environ["PAPA_URL"] + "/hf"
token = os.environ["PAPA_API_KEY"]
model = os.environ["MODEL"]
sharded = os.environ["SHARDED"]
cache = tempfile.mkdtemp()


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def download(revision, filename="model.safetensors", **kwargs):
    return hf_hub_download(
        model, filename, revision=revision, endpoint=endpoint, token=token, cache_dir=cache, **kwargs
    )


def refusal(call):
    try:
        call()
    except LocalEntryNotFoundError as error:
        # A download whose HEAD failed otherwise: the client keeps the HTTP error as the cause.
        return f"{type(error).__name__} after {error.__cause__.response.status_code}"
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as error:
        return type(error).__name__
    except HfHubHTTPError as error:
        return error.response.status_code
    return None


api = HfApi(endpoint=endpoint, token=token)
latest = api.model_info(model)
first = api.model_info(model, revision="1", files_metadata=True)
snapshot = snapshot_download(model, endpoint=endpoint, token=token, cache_dir=cache)
shards = snapshot_download(sharded, endpoint=endpoint, token=token, cache_dir=cache)
wrong = HfApi(endpoint=endpoint, token="papa_not-a-key")
print(
    json.dumps(
        {
            "version": huggingface_hub.__version__,
            "main": sha256(download("main")),
            "v1": sha256(download("1")),
            "production": sha256(download("production")),
            "by_commit": sha256(download(first.sha)),
            "latest_sha": latest.sha,
            "first_sha": first.sha,
            "siblings": [[s.rfilename, s.size, s.lfs.sha256 if s.lfs else None] for s in latest.siblings],
            "snapshot": sorted(os.listdir(snapshot)),
            "snapshot_sha": sha256(os.path.join(snapshot, "model.safetensors")),
            "sharded": {name: sha256(os.path.join(shards, name)) for name in sorted(os.listdir(shards))},
            "missing_repo": refusal(lambda: api.model_info("no-such-model")),
            "missing_revision": refusal(lambda: download("staging")),
            "missing_file": refusal(lambda: download("main", "config.json")),
            "wrong_token_info": refusal(lambda: wrong.model_info(model)),
            "wrong_token_download": refusal(
                lambda: hf_hub_download(
                    model, "model.safetensors", endpoint=endpoint, token="papa_not-a-key", cache_dir=tempfile.mkdtemp()
                )
            ),
        }
    )
)
