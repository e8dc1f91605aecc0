import numpy as np
import pytest

from ldm_jax.data import builder, shapes
from ldm_jax.evaluation import shapes as checker
from tests.sizes import SMALL_SHAPES


def read_split(data_dir, split):
    source = builder.load_builder("shapes", data_dir, **SMALL_SHAPES).as_data_source(split=split)
    return [source[i] for i in range(len(source))]


def test_heldout_design():
    assert len(shapes.ALL_COMBINATIONS) == 90 and len(shapes.HELDOUT) == 12 and len(shapes.SEEN) == 78
    assert set(shapes.HELDOUT) <= set(shapes.ALL_COMBINATIONS)
    for i, names in enumerate((shapes.COLOURS, shapes.SHAPES, shapes.PLACES)):
        assert {c[i] for c in shapes.SEEN} == set(names)  # every attribute value is still trained on


def test_builds_offline_with_features_and_split_sizes(shapes_dir):
    b = builder.load_builder("shapes", shapes_dir, **SMALL_SHAPES)
    assert b.is_prepared()
    assert {k: v.num_examples for k, v in b.info.splits.items()} == {"train": 600, "test": 200, "heldout": 120}
    assert set(b.info.features) == {"image", "caption", "colour", "shape", "position"}
    ex = read_split(shapes_dir, "test")[0]
    assert ex["image"].shape == (32, 32, 3) and ex["image"].dtype == np.uint8
    names = b.info.features
    colour, shape, position = (names[k].int2str(ex[k]) for k in ("colour", "shape", "position"))
    assert ex["caption"].decode() == shapes.caption(colour, shape, position)


def test_heldout_combinations_never_occur_in_train_or_test(shapes_dir):
    def combos(split):
        return {checker.parse_caption(ex["caption"].decode()) for ex in read_split(shapes_dir, split)}

    seen = combos("train") | combos("test")
    held = combos("heldout")
    assert held <= set(shapes.HELDOUT) and not (seen & set(shapes.HELDOUT))
    assert len(combos("train")) == 78  # 600 draws cover all 78 seen combinations


def test_deterministic_given_the_seed(tmp_path):
    a = builder.prepare("shapes", str(tmp_path / "a"), image_size=16, train_size=20, test_size=5, heldout_size=5)
    b = builder.prepare("shapes", str(tmp_path / "b"), image_size=16, train_size=20, test_size=5, heldout_size=5)
    c = builder.prepare("shapes", str(tmp_path / "c"), image_size=16, train_size=20, test_size=5, heldout_size=5, seed=1)
    get = lambda bld: sorted((ex["caption"], ex["image"].tobytes()) for ex in bld.as_data_source(split="train"))  # noqa: E731
    assert get(a) == get(b) and get(a) != get(c)


def test_rendering_follows_the_specification():
    rng = np.random.default_rng(0)
    img = shapes.render(64, "blue", "square", "top", rng)
    fg = img.max(-1) > 0
    ys, xs = np.nonzero(fg)
    side = xs.max() - xs.min() + 1
    assert 0.36 * 64 - 1 <= side <= 0.44 * 64 + 1 and fg.sum() == side * (ys.max() - ys.min() + 1)
    assert abs((xs.mean() + 0.5) / 64 - 0.5) <= 0.04 + 1 / 64 and abs((ys.mean() + 0.5) / 64 - 0.25) <= 0.04 + 1 / 64
    assert set(map(tuple, img[fg])) == {shapes.COLOURS["blue"]} and not img[~fg].any()  # no anti-aliasing
    tri = shapes.render(64, "red", "triangle", "center", rng).max(-1) > 0
    rows = tri.sum(1)[tri.any(1)]
    assert rows[0] < rows[-1]  # apex up, base down


def test_prepare_cli(tmp_path, capsys):
    from ldm_jax.data import prepare

    prepare.main(["shapes", "--data_dir", str(tmp_path), "--option", "image_size=16", "--option", "train_size=10",
                  "--option", "test_size=4", "--option", "heldout_size=3"])
    out = capsys.readouterr().out
    assert "{'train': 10, 'test': 4, 'heldout': 3}" in out
    with pytest.raises(ValueError, match="bad option for dataset 'shapes'"):
        prepare.main(["shapes", "--data_dir", str(tmp_path), "--option", "colour=red"])
    with pytest.raises(ValueError, match="key=value"):
        prepare.parse_options(["image_size"])
