"""A papa-service client on the standard library (urllib): checkpoints, merges, jobs, populations."""

import hashlib
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Dict, List, Mapping, Optional, Union

from . import safetensors


class ProblemError(Exception):
    """The service answered with an RFC 9457 problem document."""

    def __init__(self, status: int, problem: dict):
        self.status = status
        self.problem = problem
        super().__init__(f"{status} {problem.get('title', '')}: {problem.get('detail', '')}".strip())


Weights = Union[bytes, Mapping[str, object]]


def _as_bytes(weights: Weights) -> bytes:
    """A safetensors file as is, or made from a state_dict / mapping of tensors."""
    return weights if isinstance(weights, (bytes, bytearray)) else safetensors.dumps(weights)


class Client:
    """The service at `url` (default `PAPA_URL`) with the API key `key` (default `PAPA_API_KEY`)."""

    def __init__(self, url: Optional[str] = None, key: Optional[str] = None, timeout: float = 600):
        self.url = (url or os.environ.get("PAPA_URL") or "http://127.0.0.1:8080").rstrip("/")
        self.key = key or os.environ.get("PAPA_API_KEY")
        if not self.key:
            raise ValueError("no API key: pass key= or set PAPA_API_KEY")
        self.timeout = timeout

    def request(self, method: str, path: str, body=None, content_type: Optional[str] = None, length=None, to=None):
        """Sends a request; returns (status, headers, bytes), or raises ProblemError for 4xx/5xx.

        `body`: bytes, an object sent as JSON, or (with its `length`) an iterable of bytes sent as
        it is produced. With `to` (a writable binary file), the answer is copied there in chunks
        and its sha256 returned in place of its bytes."""
        data = body
        headers = {"Authorization": f"Bearer {self.key}"}
        if length is not None:
            headers["Content-Length"] = str(length)
        elif body is not None and not isinstance(body, (bytes, bytearray)):
            data = json.dumps(body).encode()
            content_type = "application/json"
        if content_type:
            headers["Content-Type"] = content_type
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as res:
                if to is None:
                    return res.status, res.headers, res.read()
                digest = hashlib.sha256()
                while chunk := res.read(1 << 20):
                    digest.update(chunk)
                    to.write(chunk)
                return res.status, res.headers, digest.hexdigest()
        except urllib.error.HTTPError as err:
            payload = err.read()
            try:
                problem = json.loads(payload)
            except ValueError:
                problem = {"detail": payload.decode(errors="replace")}
            raise ProblemError(err.code, problem) from None

    def json(self, method: str, path: str, body=None, content_type: Optional[str] = None):
        return json.loads(self.request(method, path, body, content_type)[2])

    # checkpoints

    def upload(self, weights: Union[Weights, os.PathLike, str], name: str) -> dict:
        """Uploads a safetensors file (bytes, a path, or a mapping of tensors); the checkpoint."""
        if isinstance(weights, (str, os.PathLike)):
            with open(weights, "rb") as f:
                weights = f.read()
        query = urllib.parse.urlencode({"name": name})
        return self.json("POST", f"/v1/checkpoints?{query}", _as_bytes(weights), "application/octet-stream")

    def upload_folder(self, folder: Union[os.PathLike, str], name: str) -> dict:
        """Uploads the files of a folder (not its subfolders or hidden files) as one checkpoint:
        `model.safetensors`, or shards with `model.safetensors.index.json`, and companion files
        such as `config.json` (what `save_pretrained` writes). Streamed from disk, one
        multipart/form-data request."""
        names = sorted(n for n in os.listdir(folder) if not n.startswith(".") and os.path.isfile(os.path.join(folder, n)))
        paths = [os.path.join(folder, n) for n in names]
        boundary = "papa-" + os.urandom(16).hex()
        heads = [
            (
                f"--{boundary}\r\n"
                f'Content-Disposition: form-data; name="file"; filename="{n}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n"
            ).encode()
            for n in names
        ]
        tail = f"--{boundary}--\r\n".encode()
        length = sum(len(h) + os.path.getsize(p) + 2 for h, p in zip(heads, paths)) + len(tail)

        def parts():
            for head, path in zip(heads, paths):
                yield head
                with open(path, "rb") as f:
                    while chunk := f.read(1 << 20):
                        yield chunk
                yield b"\r\n"
            yield tail

        query = urllib.parse.urlencode({"name": name})
        content_type = f"multipart/form-data; boundary={boundary}"
        return json.loads(self.request("POST", f"/v1/checkpoints?{query}", parts(), content_type, length)[2])

    def download_folder(self, checkpoint_id: str, folder: Union[os.PathLike, str]) -> List[str]:
        """Every file of a checkpoint into `folder`, streamed, each checked against its sha256;
        the paths written (a folder `from_pretrained` or `snapshot_download` users know)."""
        os.makedirs(folder, exist_ok=True)
        written = []
        for file in self.checkpoint(checkpoint_id)["files"]:
            path = os.path.join(folder, file["name"])
            with open(path + ".partial", "wb") as out:
                actual = self.request("GET", file["url"], to=out)[2]
            if actual != file["sha256"]:
                os.remove(path + ".partial")
                raise IOError(f"{file['name']}: sha256 {actual}, the service says {file['sha256']}")
            os.replace(path + ".partial", path)
            written.append(path)
        return written

    def checkpoint(self, checkpoint_id: str) -> dict:
        return self.json("GET", f"/v1/checkpoints/{checkpoint_id}")

    def download(self, checkpoint_id: str) -> bytes:
        """A checkpoint's bytes, checked against the sha256 the service gives as ETag."""
        _, headers, data = self.request("GET", f"/v1/checkpoints/{checkpoint_id}/weights")
        expected = (headers.get("ETag") or "").strip('"')
        actual = hashlib.sha256(data).hexdigest()
        if expected and actual != expected:
            raise IOError(f"checkpoint {checkpoint_id}: sha256 {actual}, the service says {expected}")
        return data

    # jobs and merges

    def job(self, job_id: str) -> dict:
        return self.json("GET", f"/v1/jobs/{job_id}")

    def wait_job(self, job_id: str, timeout: float = 3600, poll: float = 0.2) -> dict:
        """Polls a job until it has finished; raises ProblemError-like RuntimeError if it did not succeed."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job["status"] in ("succeeded", "failed", "canceled"):
                if job["status"] != "succeeded":
                    raise RuntimeError(f"job {job_id} {job['status']}: {(job.get('problem') or {}).get('detail')}")
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout} s")
            time.sleep(poll)

    def merge(self, method: str, inputs: List[str], wait: bool = True, **options) -> dict:
        """Merges checkpoints (papa-all, papa-2, weighted, papa-pull) as a job; waits for it by default."""
        job = self.json("POST", "/v1/merges", {"method": method, "inputs": list(inputs), **options})
        return self.wait_job(job["id"]) if wait else job

    # populations

    def create_population(self, name: str, size: int, method: str = "papa-all", **options) -> "Population":
        """A new population (options: alpha, seed, quorum, round_timeout_seconds, initial_checkpoint_id)."""
        return Population(self, self.json("POST", "/v1/populations", {"name": name, "size": size, "method": method, **options}))

    def population(self, population_id: str) -> "Population":
        return Population(self, self.json("GET", f"/v1/populations/{population_id}"))


class Population:
    """One member's (or a coordinator's) handle on a population, at round `round`.

    A member's loop: ``submit(j, model.state_dict())``, then ``next_state_dict(j, like=...)``,
    which waits for the round to close, returns member j's next weights and moves to the next
    round.
    """

    def __init__(self, client: Client, data: dict):
        self.client = client
        self.id = data["id"]
        self.size = data["size"]
        self.round = data["current_round"]

    def state(self) -> dict:
        return self.client.json("GET", f"/v1/populations/{self.id}")

    def submit(self, member: int, weights: Weights, round: Optional[int] = None) -> dict:
        """Submits member `member`'s weights (a state_dict, a mapping of tensors, or safetensors bytes)."""
        r = self.round if round is None else round
        path = f"/v1/populations/{self.id}/rounds/{r}/members/{member}"
        return self.client.json("PUT", path, _as_bytes(weights), "application/octet-stream")

    def wait(self, round: Optional[int] = None, timeout: float = 86400) -> dict:
        """Waits until the round has closed (every member's next weights ready); the round."""
        r = self.round if round is None else round
        deadline = time.monotonic() + timeout
        while True:
            left = max(0, min(300, int(deadline - time.monotonic())))
            state = self.client.json("GET", f"/v1/populations/{self.id}/rounds/{r}?wait={left}")
            if state["status"] == "closed":
                return state
            if state["status"] == "failed":
                raise RuntimeError(f"round {r} of population {self.id} failed (job {state['job_id']})")
            if time.monotonic() >= deadline:
                raise TimeoutError(f"round {r} of population {self.id} still {state['status']}")

    def next_weights(self, member: int) -> bytes:
        """Member `member`'s next weights from this round (waiting for it to close), as safetensors bytes; moves to the next round."""
        state = self.wait()
        output = next(o for o in state["outputs"] if o["member"] == member)
        data = self.client.download(output["checkpoint_id"])
        self.round += 1
        return data

    def next_state_dict(self, member: int, like: Optional[Mapping[str, object]] = None) -> Dict[str, object]:
        """`next_weights` as a state_dict of torch tensors (matching `like`'s dtypes and devices)."""
        return safetensors.load_state_dict(self.next_weights(member), like)

    def next_arrays(self, member: int) -> Dict[str, object]:
        """`next_weights` as numpy arrays."""
        tensors, _ = safetensors.loads(self.next_weights(member))
        return {name: safetensors.to_numpy(t) for name, t in tensors.items()}

    def finish(self, wait: bool = True) -> dict:
        """Ends the population with the uniform soup of its last round; the job (its result holds soup_checkpoint_id)."""
        job = self.client.json("POST", f"/v1/populations/{self.id}/finish")
        return self.client.wait_job(job["id"]) if wait else job
