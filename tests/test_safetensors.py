"""The from-scratch safetensors reader and writer, against the `safetensors` package and broken files."""

import json
import random
import struct

import pytest
import torch

from deebert import safetensors
from deebert.errors import DeeBertError

st = pytest.importorskip("safetensors.torch")


def test_reader_agrees_with_the_reference_on_the_real_checkpoint(minilm_dir):
    path = minilm_dir / "model.safetensors"
    ours, theirs = safetensors.load_file(path), st.load_file(path)
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype and torch.equal(ours[name], theirs[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int8, torch.bool])
def test_writer_files_load_in_the_reference(tmp_path, dtype):
    torch.manual_seed(0)
    tensors = {"a": (torch.randn(3, 5) * 10).to(dtype), "b.c": torch.randn(7).to(dtype),
               "scalar": torch.tensor(2).to(dtype), "empty": torch.zeros(0, 4).to(dtype), "mixed": torch.randn(2, 2)}
    path = tmp_path / "x.safetensors"
    safetensors.save_file(tensors, path, metadata={"format": "pt"})
    for loaded in (st.load_file(path), safetensors.load_file(path)):
        assert loaded.keys() == tensors.keys()
        for name, tensor in tensors.items():
            assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor)


def test_reference_files_load_in_ours(tmp_path):
    tensors = {"w": torch.randn(4, 3).bfloat16(), "i": torch.arange(5), "h": torch.randn(3).half()}
    st.save_file(tensors, tmp_path / "ref.safetensors")
    loaded = safetensors.load_file(tmp_path / "ref.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())


def write_raw(path, header, data: bytes = b"", header_len=None):
    header_bytes = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(header_bytes) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", length) + header_bytes + data)
    return path


GOOD_ENTRY = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize("case, needle", [
    ("truncated", "truncated"),
    ("header_too_long", "header claims"),
    ("huge_header", "header claims"),
    ("not_json", "not valid JSON"),
    ("not_object", "not a JSON object"),
    ("offsets_outside", "outside"),
    ("unknown_dtype", "unknown dtype"),
    ("bad_shape", "invalid shape"),
    ("size_mismatch", "needs"),
    ("missing_fields", "lacks"),
])
def test_broken_files_raise_one_line_errors_naming_the_file(tmp_path, case, needle):
    path = tmp_path / "broken.safetensors"
    if case == "truncated":
        path.write_bytes(b"\x01\x02\x03")
    elif case == "header_too_long":
        write_raw(path, {"a": GOOD_ENTRY}, b"\0" * 8, header_len=10_000)
    elif case == "huge_header":  # claims 1 TB: must fail before allocating anything
        write_raw(path, b"{}", header_len=2**40)
    elif case == "not_json":
        write_raw(path, b"{not json", b"")
    elif case == "not_object":
        write_raw(path, b"[1, 2]", b"")
    elif case == "offsets_outside":
        write_raw(path, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8)
    elif case == "unknown_dtype":
        write_raw(path, {"a": {"dtype": "F7", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8)
    elif case == "bad_shape":
        write_raw(path, {"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8)
    elif case == "size_mismatch":
        write_raw(path, {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8)
    elif case == "missing_fields":
        write_raw(path, {"a": {"dtype": "F32"}}, b"\0" * 8)
    with pytest.raises(DeeBertError) as err:
        safetensors.load_file(path)
    message = str(err.value)
    assert needle in message and str(path) in message and "\n" not in message


def test_missing_file_names_it(tmp_path):
    with pytest.raises(DeeBertError, match="not found"):
        safetensors.load_file(tmp_path / "nope.safetensors")


def test_random_and_mutated_bytes_either_load_or_raise_our_error(tmp_path):
    """A small fuzzer: whatever the bytes, the reader loads them or raises DeeBertError, nothing else."""
    valid = tmp_path / "valid.safetensors"
    safetensors.save_file({"w": torch.randn(3, 4), "b": torch.arange(6), "h": torch.randn(5).half()}, valid)
    original = valid.read_bytes()
    rng = random.Random(1234)
    path = tmp_path / "fuzz.safetensors"
    outcomes = {"loaded": 0, "rejected": 0}
    for trial in range(400):
        if trial % 4 == 0:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
        else:
            data = bytearray(original)
            for _ in range(rng.randrange(1, 6)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            if trial % 7 == 0:
                data = data[: rng.randrange(len(data))]
        path.write_bytes(bytes(data))
        try:
            for tensor in safetensors.load_file(path).values():
                tensor.sum()  # touch every byte that was mapped
            outcomes["loaded"] += 1
        except DeeBertError:
            outcomes["rejected"] += 1
    assert outcomes["loaded"] > 0 and outcomes["rejected"] > 0


def test_save_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    safetensors.save_file({"a": torch.ones(2)}, path)
    before = path.read_bytes()

    bad = {"a": torch.ones(2), "b": torch.ones(3)}
    monkeypatch.setattr(torch.Tensor, "contiguous", lambda self: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        safetensors.save_file(bad, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temporary file left behind
