"""A file that is not a checkpoint (random bytes, an image, a zip of something else) is called that, by name, instead
of "objects other than tensors"; a real pickle payload is still refused as unsafe."""
from __future__ import annotations

import io
import pickle
import zipfile

import numpy as np
import pytest
from PIL import Image

from trainer import evaluate
from trainer.checkpoint import TORCH_FILE_MAGIC, CheckpointError, load_checkpoint


def _random_bytes(n: int = 4096) -> bytes:
    data = np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8).tobytes()
    assert not data.startswith(TORCH_FILE_MAGIC)  # the seeded bytes do not look like a torch file by chance
    return data


def test_random_bytes_are_not_a_checkpoint(tmp_path):
    path = tmp_path / "model.pt"
    data = _random_bytes()
    path.write_bytes(data)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(info.value) == (f"{path} is not a checkpoint: expected a .pt file written by save_checkpoint, got 4096 "
                               f"bytes that are not a torch.save file (it begins with {data[:4].hex(' ')}); "
                               "check the path")


@pytest.mark.parametrize("kind", ["png", "empty"])
def test_other_files_are_not_a_checkpoint(tmp_path, kind):
    path = tmp_path / "model.pt"
    if kind == "png":
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(path, format="PNG")
    else:
        path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="is not a checkpoint: expected a .pt file written by save_checkpoint"):
        load_checkpoint(path)


def test_a_zip_of_something_else_is_an_unreadable_torch_file(tmp_path):
    path = tmp_path / "model.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "hello")
    with pytest.raises(CheckpointError, match="is not a readable torch file"):
        load_checkpoint(path)


def test_a_pickle_payload_is_still_refused_as_unsafe(tmp_path):
    path = tmp_path / "model.pt"
    buf = io.BytesIO()
    pickle.dump({"x": io.StringIO("not a tensor")}, buf, protocol=2)
    path.write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError, match="contains objects other than tensors and plain types"):
        load_checkpoint(path)


def test_evaluate_with_random_bytes_is_one_line(tmp_path, capsys, synthetic_root):
    path = tmp_path / "model.pt"
    path.write_bytes(_random_bytes())
    assert evaluate.main(["--checkpoint", str(path), "--data", str(synthetic_root), "--out",
                          str(tmp_path / "eval")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {path} is not a checkpoint: expected a .pt file written by save_checkpoint")
    assert not (tmp_path / "eval").exists()  # nothing but its config and log: removed
