"""pytest against a running service: PAPA_URL and PAPA_API_KEY name it (test/python-client.test.ts
starts one and runs these)."""

import hashlib
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from papa_client import Client, ProblemError, Tensor, dumps, load_state_dict, loads, to_numpy


@pytest.fixture(scope="module")
def client():
    return Client()


def weights(k: float):
    return {"w": np.array([k, 2 * k, -k, 1], dtype=np.float32), "steps": np.array(10 + k, dtype=np.int64)}


def test_safetensors_round_trip_with_every_kind_of_value():
    bf16 = Tensor("BF16", (2,), struct.pack("<2H", 0x3F80, 0xC000))  # 1.0, -2.0
    data = dumps({"a": np.arange(6, dtype=np.float16).reshape(2, 3), "b": np.array([True, False]), "c": bf16}, {"k": "v"})
    (length,) = struct.unpack_from("<Q", data)
    assert (8 + length) % 8 == 0
    tensors, metadata = loads(data)
    assert metadata == {"k": "v"}
    assert list(tensors) == ["a", "b", "c"]
    assert to_numpy(tensors["a"]).tolist() == [[0, 1, 2], [3, 4, 5]]
    assert to_numpy(tensors["b"]).tolist() == [True, False]
    assert tensors["c"] == bf16


def test_the_service_takes_what_the_client_writes_and_gives_it_back(client):
    data = dumps(weights(3))
    checkpoint = client.upload(data, "py-upload")
    assert checkpoint["sha256"] == hashlib.sha256(data).hexdigest()
    assert checkpoint["dtypes"] == ["F32", "I64"]
    assert client.download(checkpoint["id"]) == data


def save_sharded(folder, k: float):
    """A model in Hugging Face's sharded layout, as `save_pretrained` writes it: two shards, their index, config.json."""
    shards = {
        "model-00001-of-00002.safetensors": {"embed": np.full((2, 2), k, dtype=np.float32)},
        "model-00002-of-00002.safetensors": {"head": np.array([k, -k], dtype=np.float32), "steps": np.array(k, dtype=np.int64)},
    }
    weight_map = {}
    for shard, tensors in shards.items():
        with open(os.path.join(folder, shard), "wb") as f:
            f.write(dumps(tensors, {"format": "pt"}))
        weight_map.update({name: shard for name in tensors})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 32}, "weight_map": weight_map}, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"model_type": "toy", "k": k}, f)


def test_a_saved_folder_goes_up_whole_and_comes_back_whole(client, tmp_path):
    ids = []
    for k in (1.0, 3.0):
        folder = tmp_path / f"model-{k}"
        folder.mkdir()
        save_sharded(folder, k)
        (folder / ".cache").write_text("not sent")
        checkpoint = client.upload_folder(folder, "py-sharded")
        assert sorted(f["name"] for f in checkpoint["files"]) == sorted(n for n in os.listdir(folder) if n != ".cache")
        back = client.download_folder(checkpoint["id"], tmp_path / f"back-{k}")
        for path in back:
            with open(path, "rb") as got, open(folder / os.path.basename(path), "rb") as sent:
                assert got.read() == sent.read()
        ids.append(checkpoint["id"])
    job = client.merge("papa-all", ids)
    merged = client.download_folder(job["result"]["checkpoints"][0]["id"], tmp_path / "merged")
    assert sorted(os.path.basename(p) for p in merged) == [
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]
    with open(tmp_path / "merged" / "model-00001-of-00002.safetensors", "rb") as f:
        tensors, metadata = loads(f.read())
    assert to_numpy(tensors["embed"]).tolist() == [[2.0, 2.0], [2.0, 2.0]]
    assert metadata["format"] == "pt"
    with open(tmp_path / "merged" / "model.safetensors.index.json") as f:
        assert json.load(f)["weight_map"] == {
            "embed": "model-00001-of-00002.safetensors",
            "head": "model-00002-of-00002.safetensors",
            "steps": "model-00002-of-00002.safetensors",
        }


def test_merges_as_numpy_would(client):
    ids = [client.upload(weights(k), f"py-{k}")["id"] for k in (1, 2, 6)]
    job = client.merge("weighted", ids, coefficients=[0.5, 0.25, 0.25])
    tensors, _ = loads(client.download(job["result"]["checkpoints"][0]["id"]))
    expected = 0.5 * weights(1)["w"] + 0.25 * weights(2)["w"] + 0.25 * weights(6)["w"]
    assert to_numpy(tensors["w"]).tolist() == expected.tolist()
    assert to_numpy(tensors["steps"]).tolist() == 11  # from the heaviest input


def test_a_population_round_gives_each_member_the_average(client):
    population = client.create_population("py-pop", 2, "papa", alpha=0.5)
    members = [client.population(population.id) for _ in range(2)]
    for j, member in enumerate(members):
        assert member.submit(j, weights(2 * j + 1))["round"] == 0
    mean = (weights(1)["w"] + weights(3)["w"]) / 2
    for j, member in enumerate(members):
        arrays = member.next_arrays(j)
        own = weights(2 * j + 1)["w"]
        assert arrays["w"].tolist() == (0.5 * own + 0.5 * mean).tolist()
        assert member.round == 1
    with pytest.raises(ProblemError) as refused:
        members[0].submit(0, weights(5), round=0)
    assert refused.value.status == 409
    job = members[0].finish()
    soup, _ = loads(client.download(job["result"]["soup_checkpoint_id"]))
    assert to_numpy(soup["w"]).tolist() == mean.tolist()


def test_problems_carry_the_status_and_the_detail(client):
    with pytest.raises(ProblemError) as bad:
        client.create_population("too-small", 1)
    assert bad.value.status == 422
    with pytest.raises(ProblemError) as missing:
        client.checkpoint("01a21c82-9c47-7abd-a849-4a1c03318636")
    assert missing.value.status == 404 and "not found" in str(missing.value)


def test_pytorch_state_dicts_travel_as_they_are(client):
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    state = model.state_dict()
    state["0.weight"] = state["0.weight"].to(torch.bfloat16)
    checkpoint = client.upload(state, "torch")
    assert sorted(checkpoint["dtypes"]) == ["BF16", "F32", "I64"]
    back = load_state_dict(client.download(checkpoint["id"]), like=model.state_dict())
    assert back.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(back[name], tensor.to(back[name].dtype)), name
    assert back["0.weight"].dtype == torch.float32  # as `like` has it
    model.load_state_dict(back)


def test_the_pytorch_example_trains_a_population_for_real(client):
    """examples/pytorch_papa.py, small: 2 member processes, 1 epoch of 1024 images."""
    pytest.importorskip("torch")
    data = os.environ.get("PAPA_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")
    if not os.path.exists(os.path.join(data, "train-images-idx3-ubyte.gz")):
        pytest.skip(f"no Fashion-MNIST in {data} (Debian's dataset-fashion-mnist)")
    example = os.path.join(os.path.dirname(__file__), "..", "..", "..", "examples", "pytorch_papa.py")
    run = subprocess.run(
        [sys.executable, example, "--members", "2", "--epochs", "2", "--train", "1024", "--data", data],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr
    row = run.stdout.strip().splitlines()[-1].split("|")
    members, mean, soup = row[5].split(), float(row[6]), float(row[7])
    assert len(members) == 2
    # A soup of members pulled together every epoch is a working model, not chance (10%).
    assert mean > 50 and soup > 50, run.stdout
