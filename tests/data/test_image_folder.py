import csv
import io
import json
import os

import numpy as np
import PIL.Image
import pytest

from ldm_jax.data import image_folder
from ldm_jax.data.builder import prepare

SIZE = 16
# file -> (width, height, colour); solid colours, so each read-back image shows which file it came from.
GOOD = {
    "wide.png": (60, 20, (200, 40, 40)),  # centre third coloured, outer thirds not: tests the crop
    "tall.jpg": (30, 50, (40, 160, 60)),
    "square.png": (64, 64, (30, 60, 220)),
    "tiny.jpeg": (12, 9, (230, 210, 40)),  # smaller than SIZE: upscaled
    "clear.png": (40, 40, (255, 255, 255)),  # fully transparent: composited onto white
    "photo.JPG": (50, 40, (120, 50, 160)),
}
BAD = ("broken.jpg", "empty.png", "notes.png")


def caption(file: str) -> str:
    return f"a picture, named {file}"  # the comma exercises CSV quoting


def write_folder(folder, source: str) -> None:
    folder.mkdir()
    for file, (w, h, colour) in GOOD.items():
        if file == "wide.png":
            pixels = np.zeros((h, w, 3), np.uint8)
            pixels[:, w // 3: 2 * w // 3] = colour
            pixels[:, 2 * w // 3:] = (0, 0, 255)
            image = PIL.Image.fromarray(pixels)
        elif file == "clear.png":
            image = PIL.Image.new("RGBA", (w, h), (0, 0, 0, 0))
        else:
            image = PIL.Image.new("RGB", (w, h), colour)
        image.save(folder / file, format="JPEG" if file.lower().endswith(("jpg", "jpeg")) else "PNG")
    jpeg = io.BytesIO()
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(jpeg, "JPEG")
    (folder / "broken.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_text("not an image\n")

    files = [*GOOD, *BAD]  # the bad files have captions too, so only unreadability can skip them
    if source == "txt":
        for file in files:
            (folder / (os.path.splitext(file)[0] + ".txt")).write_text(caption(file) + "\n")
    elif source == "jsonl":
        lines = (json.dumps({"file": f, "text": caption(f)}) + "\n" for f in files)
        (folder / "captions.jsonl").write_text("".join(lines))
    else:
        with open(folder / "captions.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file", "text"])
            writer.writerows([file, caption(file)] for file in files)


@pytest.mark.parametrize("source", ["txt", "jsonl", "csv"])
def test_build_skips_exactly_the_unreadable_files(tmp_path, source):
    folder = tmp_path / "pictures"
    write_folder(folder, source)
    builder = prepare("image_folder", str(tmp_path / "data"), folder=str(folder), image_size=SIZE, test_fraction=0.2)

    with open(os.path.join(builder.data_dir, image_folder.REPORT_FILE)) as f:
        reported = [line.split("\t")[0] for line in f.read().splitlines()]
    assert sorted(reported) == sorted(BAD)

    sources = builder.as_data_source()
    assert {split: len(s) for split, s in sources.items()} == {"train": 5, "test": 1}
    records = [s[i] for s in sources.values() for i in range(len(s))]
    assert sorted(r["file"].decode() for r in records) == sorted(GOOD)
    for r in records:
        file, image = r["file"].decode(), r["image"]
        assert r["caption"].decode() == caption(file)
        assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
        colour = np.array(GOOD[file][2])
        np.testing.assert_allclose(image.reshape(-1, 3).mean(0), colour, atol=8, err_msg=file)
        centre = image[SIZE // 4: -SIZE // 4, SIZE // 4: -SIZE // 4].reshape(-1, 3).astype(int)
        assert np.abs(centre - colour).max() <= 8, file  # squashing instead of cropping would show black/blue


def test_missing_folder_is_a_value_error_naming_it(tmp_path):
    missing = tmp_path / "no_such_pictures"
    with pytest.raises(ValueError, match="no_such_pictures"):
        prepare("image_folder", str(tmp_path / "data"), folder=str(missing))


def test_folder_without_captions_is_a_value_error_naming_it(tmp_path):
    folder = tmp_path / "uncaptioned"
    folder.mkdir()
    PIL.Image.new("RGB", (20, 20), "red").save(folder / "a.png")
    with pytest.raises(ValueError, match="uncaptioned"):
        prepare("image_folder", str(tmp_path / "data"), folder=str(folder))


def test_config_names_differ_by_folder_and_options(tmp_path):
    names = {image_folder.image_folder_config(str(tmp_path / "a" / "pictures")).name,
             image_folder.image_folder_config(str(tmp_path / "b" / "pictures")).name,
             image_folder.image_folder_config(str(tmp_path / "a" / "pictures"), image_size=64).name}
    assert len(names) == 3
    assert all(name.startswith("pictures_") for name in names)


def test_caption_sources_precedence(tmp_path):
    """captions.jsonl over captions.csv over same-stem .txt; empty captions don't count."""
    for name in ("a.png", "b.png", "c.png", "d.png"):
        (tmp_path / name).write_bytes(b"")  # read_captions does not open the images
        (tmp_path / name.replace(".png", ".txt")).write_text(f"txt {name}")
    (tmp_path / "d.txt").write_text("  \n")
    (tmp_path / "captions.jsonl").write_text(json.dumps({"file": "a.png", "text": "jsonl a"}) + "\n")
    (tmp_path / "captions.csv").write_text("file,text\na.png,csv a\nb.png,csv b\n")
    assert image_folder.read_captions(str(tmp_path)) == {"a.png": "jsonl a", "b.png": "csv b", "c.png": "txt c.png"}
