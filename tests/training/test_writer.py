"""MetricWriter: event files read back record by record (scalars and PNG images exact),
metrics.jsonl lines, image_grid's tile positions and padding, save_png round trip."""
import io
import json
import os
import struct

import numpy as np
import PIL.Image
import pytest
from tensorboardX.proto import event_pb2

from ldm_jax.runs.writer import MetricWriter, image_grid, save_png


def read_events(workdir):
    """Every Event in the run's event files (TFRecord framing: length, crc, data, crc)."""
    events = []
    for name in sorted(os.listdir(workdir)):
        if not name.startswith("events.out.tfevents"):
            continue
        with open(os.path.join(workdir, name), "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            pos += 12  # length and its crc
            events.append(event_pb2.Event.FromString(data[pos:pos + length]))
            pos += length + 4  # data and its crc
    return events


def summaries(events):
    """(tag, step, value) for every summary value, in file order."""
    return [(v.tag, e.step, v) for e in events if e.HasField("summary") for v in e.summary.value]


def test_scalars_reach_event_file_and_jsonl(tmp_path):
    with MetricWriter(str(tmp_path)) as writer:
        writer.write_scalars(10, {"ldm/loss": 0.5, "ldm/lr": np.float32(1e-4)})
        writer.write_scalars(20, {"ldm/loss": np.asarray(0.25), "ldm/nonfinite": float("nan")})
    got = [(tag, step, v.simple_value) for tag, step, v in summaries(read_events(tmp_path))]
    assert got[:3] == [("ldm/loss", 10, 0.5), ("ldm/lr", 10, pytest.approx(1e-4)), ("ldm/loss", 20, 0.25)]
    assert got[3][:2] == ("ldm/nonfinite", 20) and np.isnan(got[3][2])

    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0] == {"step": 10, "ldm/loss": 0.5, "ldm/lr": pytest.approx(1e-4)}
    assert lines[1]["step"] == 20 and lines[1]["ldm/loss"] == 0.25 and np.isnan(lines[1]["ldm/nonfinite"])


def test_jsonl_is_appended_on_resume(tmp_path):
    for step in (1, 2):  # two runs in one workdir
        with MetricWriter(str(tmp_path)) as writer:
            writer.write_scalars(step, {"x": step})
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 1, "x": 1.0}, {"step": 2, "x": 2.0}]
    assert [step for _, step, _ in summaries(read_events(tmp_path))] == [1, 2]


def test_images_are_written_exactly(tmp_path):
    rng = np.random.default_rng(0)
    single = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    batch = rng.integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
    with MetricWriter(str(tmp_path)) as writer:
        writer.write_images(7, {"grid": single, "batch": batch})
        with pytest.raises(ValueError, match="uint8"):
            writer.write_images(7, {"bad": single.astype(np.float32)})
    got = {tag: (step, v.image) for tag, step, v in summaries(read_events(tmp_path))}
    for tag, want in (("grid", single), ("batch", image_grid(batch))):
        step, image = got[tag]
        assert step == 7 and (image.height, image.width) == want.shape[:2]
        decoded = np.asarray(PIL.Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB"))
        np.testing.assert_array_equal(decoded, want)


def test_image_grid_tile_positions_and_padding():
    n, h, w, pad = 5, 2, 3, 1
    images = np.stack([np.full((h, w, 3), 10 * (i + 1), np.uint8) for i in range(n)])
    grid = image_grid(images, cols=3, pad=pad, pad_value=255)
    assert grid.shape == (2 * (h + pad) + pad, 3 * (w + pad) + pad, 3)  # 2 rows: 7 x 13
    expected = np.full(grid.shape, 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, 3)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        expected[top:top + h, left:left + w] = 10 * (i + 1)
    np.testing.assert_array_equal(grid, expected)
    # Spot checks written out by hand: tile 4 (row 1, col 1) starts at (4, 5); the cell after the
    # last image (row 1, col 2) is padding; the separators are padding.
    assert grid[4, 5, 0] == 50 and grid[5, 7, 0] == 50 and grid[4, 9, 0] == 255
    assert (grid[3] == 255).all() and (grid[:, 4] == 255).all()


def test_image_grid_defaults_and_no_padding():
    images = np.arange(4 * 2 * 2 * 3, dtype=np.uint8).reshape(4, 2, 2, 3)
    grid = image_grid(images, pad=0)  # cols = ceil(sqrt(4)) = 2
    top = np.concatenate([images[0], images[1]], axis=1)
    bottom = np.concatenate([images[2], images[3]], axis=1)
    np.testing.assert_array_equal(grid, np.concatenate([top, bottom], axis=0))
    assert image_grid(images[:3]).shape == (2 * 3 + 1, 2 * 3 + 1, 3)  # 2 x 2 cells, pad 1


def test_save_png_round_trip(tmp_path):
    image = np.random.default_rng(1).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    path = tmp_path / "samples" / "step_0000010.png"  # the folder does not exist yet
    save_png(str(path), image)
    np.testing.assert_array_equal(np.asarray(PIL.Image.open(path)), image)
