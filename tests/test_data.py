"""Tests for training.data: sources on tiny generated fixtures, cache, split, augment, synthetic."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from modelpack.preprocess import resize_center_crop, to_rgb
from training.data import (
    DataConfig,
    ImageSet,
    augment_batch,
    load_dataset,
    random_resized_crop,
    split_dataset,
    to_tensor,
)
from training.data import imageset as imageset_mod
from training.data import sources as sources_mod

# ---------------------------------------------------------------- fixtures


def _encode(colour: tuple[int, int, int], size: tuple[int, int], fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


def _make_folder(root: Path) -> Path:
    """b_cls: 3 shades of red (one non-square, one upper-case extension); a_cls: 2 blues."""
    (root / "b_cls").mkdir(parents=True)
    (root / "a_cls").mkdir()
    (root / "b_cls" / "2.png").write_bytes(_encode((255, 0, 0), (16, 16), "PNG"))
    (root / "b_cls" / "0.JPG").write_bytes(_encode((200, 0, 0), (16, 16), "JPEG"))
    (root / "b_cls" / "1.png").write_bytes(_encode((100, 0, 0), (40, 20), "PNG"))
    (root / "a_cls" / "x.png").write_bytes(_encode((0, 0, 255), (16, 16), "PNG"))
    (root / "a_cls" / "y.bmp").write_bytes(_encode((0, 0, 255), (8, 8), "BMP"))
    (root / "a_cls" / "notes.txt").write_text("not an image")
    (root / "stray.png").write_bytes(_encode((0, 255, 0), (16, 16), "PNG"))  # not in a class dir
    return root


def _add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _make_tar_dataset(root: Path) -> Path:
    """Two shards (gzip and plain) of three wnids, with wnids.txt and words.txt."""
    root.mkdir(parents=True)
    colours = {"n003": (255, 0, 0), "n001": (0, 255, 0), "n002": (0, 0, 255)}
    with tarfile.open(root / "train-00.tar.gz", "w:gz") as tf:
        for wnid in ("n003", "n001"):
            for i in range(3):
                _add_member(
                    tf, f"train/{wnid}/{wnid}_{i}.JPEG", _encode(colours[wnid], (8, 8), "PNG")
                )
        _add_member(tf, "train/n001/n001_boxes.txt", b"0 0 1 1")
    with tarfile.open(root / "train-01.tar", "w") as tf:
        for i in range(2):
            _add_member(tf, f"train/n002/n002_{i}.JPEG", _encode(colours["n002"], (8, 8), "PNG"))
    (root / "wnids.txt").write_text("n003\nn001\nn002\n")
    (root / "words.txt").write_text(
        "n001\tEgyptian cat, cat\nn002\tcrane\nn003\tcrane, derrick\nn999\tunused\n"
    )
    return root


def _make_cifar(root: Path) -> Path:
    """Four 32x32 images, fine labels over unsorted names, in the official pickle layout."""
    root.mkdir(parents=True)
    chw = np.zeros((4, 3, 32, 32), dtype=np.uint8)
    chw[:, 0, 0, 1] = [10, 20, 30, 40]  # red channel at row 0, column 1 tags each row
    chw[:, 2, 5, 0] = 200  # blue channel at row 5, column 0
    train = {
        b"data": chw.reshape(4, 3072),
        b"fine_labels": [0, 1, 0, 2],
        b"filenames": [b"d.png", b"b.png", b"c.png", b"a.png"],
    }
    meta = {b"fine_label_names": [b"zebra", b"apple", b"maple"]}
    (root / "train").write_bytes(pickle.dumps(train))
    (root / "meta").write_bytes(pickle.dumps(meta))
    (root / "test").write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8)}))
    return root


# ---------------------------------------------------------------- sources


def test_folder_source(tmp_path: Path) -> None:
    root = _make_folder(tmp_path / "shapes")
    ds = load_dataset(DataConfig(kind="folder", path=str(root), image_size=12, cache_dir=""))
    assert ds.class_ids == ["a_cls", "b_cls"] and ds.class_names == ds.class_ids
    assert ds.name == "shapes" and ds.num_classes == 2 and len(ds) == 5
    assert ds.images.shape == (5, 12, 12, 3) and ds.images.dtype == np.uint8
    assert ds.labels.dtype == np.int64 and ds.labels.tolist() == [0, 0, 1, 1, 1]
    means = ds.images.reshape(5, -1, 3).mean(axis=1)
    assert np.allclose(means[:2], [0, 0, 255], atol=3)
    assert np.allclose(means[2:], [[200, 0, 0], [100, 0, 0], [255, 0, 0]], atol=3)  # by name


def test_folder_classes_and_cap(tmp_path: Path) -> None:
    root = _make_folder(tmp_path / "shapes")
    one = load_dataset(DataConfig(kind="folder", path=str(root), classes=1, cache_dir=""))
    assert one.class_ids == ["a_cls"] and len(one) == 2
    capped = load_dataset(DataConfig(kind="folder", path=str(root), max_per_class=1, cache_dir=""))
    assert capped.labels.tolist() == [0, 1]
    assert abs(int(capped.images[1, 0, 0, 0]) - 200) <= 3  # b_cls keeps "0.JPG", first by name


def test_tar_source(tmp_path: Path) -> None:
    root = _make_tar_dataset(tmp_path / "tiny")
    ds = load_dataset(DataConfig(kind="tar", path=str(root), image_size=8, cache_dir=""))
    assert ds.class_ids == ["n001", "n002", "n003"]  # sorted, not the wnids.txt order
    assert ds.class_names == ["Egyptian cat", "crane (n002)", "crane (n003)"]
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    assert ds.name == "tiny"
    assert ds.images[0, 0, 0].tolist() == [0, 255, 0]
    assert ds.images[-1, 0, 0].tolist() == [255, 0, 0]

    two = load_dataset(
        DataConfig(
            kind="tar", path=str(root), image_size=8, classes=2, max_per_class=2, cache_dir=""
        )
    )
    assert two.class_ids == ["n001", "n002"] and two.labels.tolist() == [0, 0, 1, 1]

    with pytest.raises(
        ValueError, match="no images"
    ):  # n001/n003 are in wnids.txt, not in this shard
        load_dataset(DataConfig(kind="tar", path=str(root / "train-01.tar"), cache_dir=""))


def test_tar_without_lists(tmp_path: Path) -> None:
    root = _make_tar_dataset(tmp_path / "bare")
    (root / "wnids.txt").unlink()
    (root / "words.txt").unlink()
    ds = load_dataset(DataConfig(kind="tar", path=str(root / "train-00.tar.gz"), cache_dir=""))
    assert ds.class_ids == ["n001", "n003"] and ds.class_names == ds.class_ids and len(ds) == 6


def test_cifar100_source(tmp_path: Path) -> None:
    root = _make_cifar(tmp_path / "cifar-100-python")
    ds = load_dataset(DataConfig(kind="cifar100", path=str(root), cache_dir=""))
    assert ds.class_ids == ["apple", "maple", "zebra"] and ds.class_names == ds.class_ids
    assert ds.images.shape == (4, 32, 32, 3)
    # grouped by new label, then file name: apple=row1, maple=row3, zebra=row2 "c", row0 "d"
    assert ds.labels.tolist() == [0, 1, 2, 2]
    assert ds.images[:, 0, 1, 0].tolist() == [20, 40, 30, 10]
    assert (ds.images[:, 5, 0, 2] == 200).all() and (ds.images[:, 0, 5, 2] == 0).all()

    small = load_dataset(
        DataConfig(kind="cifar100", path=str(root), image_size=16, classes=2, cache_dir="")
    )
    assert small.images.shape == (2, 16, 16, 3) and small.class_ids == ["apple", "maple"]
    capped = load_dataset(
        DataConfig(kind="cifar100", path=str(root), max_per_class=1, cache_dir="")
    )
    assert capped.images[:, 0, 1, 0].tolist() == [20, 40, 30]


def test_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown dataset kind"):
        load_dataset(DataConfig(kind="imagenet", path="x"))


# ---------------------------------------------------------------- cache


def test_cache_hit_skips_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _make_tar_dataset(tmp_path / "tiny")
    cfg = DataConfig(kind="tar", path=str(root), image_size=8, cache_dir=str(tmp_path / "cache"))
    first = load_dataset(cfg)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded again despite a cache hit")

    monkeypatch.setattr(imageset_mod, "decode_image", boom)
    monkeypatch.setitem(sources_mod.LOADERS, "tar", (sources_mod.LOADERS["tar"][0], boom))
    second = load_dataset(cfg)
    assert np.array_equal(first.images, second.images) and second.images.dtype == np.uint8
    assert np.array_equal(first.labels, second.labels) and second.labels.dtype == np.int64
    assert (first.class_ids, first.class_names, first.name) == (
        second.class_ids,
        second.class_names,
        second.name,
    )


def test_cache_invalidated_by_source_change(tmp_path: Path) -> None:
    root = _make_folder(tmp_path / "shapes")
    cfg = DataConfig(kind="folder", path=str(root), image_size=8, cache_dir=str(tmp_path / "cache"))
    load_dataset(cfg)
    load_dataset(DataConfig(**{**cfg.__dict__, "image_size": 10}))  # another config, another key
    (root / "a_cls" / "z.png").write_bytes(_encode((0, 0, 255), (8, 8), "PNG"))
    assert len(load_dataset(cfg)) == 6
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 3


def test_corrupt_cache_is_rebuilt(tmp_path: Path) -> None:
    root = _make_folder(tmp_path / "shapes")
    cfg = DataConfig(kind="folder", path=str(root), image_size=8, cache_dir=str(tmp_path / "cache"))
    first = load_dataset(cfg)
    (cached,) = (tmp_path / "cache").glob("*.npz")
    cached.write_bytes(b"truncated")
    assert np.array_equal(load_dataset(cfg).images, first.images)


# ---------------------------------------------------------------- preprocess


def test_to_rgb_modes() -> None:
    rgba = Image.new("RGBA", (2, 2), (10, 20, 30, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    half = Image.new("RGBA", (1, 1), (0, 0, 0, 128))
    assert to_rgb(half).getpixel((0, 0)) == (127, 127, 127)
    assert to_rgb(Image.new("L", (1, 1), 7)).getpixel((0, 0)) == (7, 7, 7)
    assert to_rgb(Image.new("RGB", (1, 1), (1, 2, 3)).convert("P")).mode == "RGB"
    wide = Image.fromarray(np.array([[0, 256, 65535]], dtype=np.uint16))
    assert np.asarray(to_rgb(wide))[0, :, 0].tolist() == [0, 1, 255]  # scaled, not clipped
    assert to_rgb(Image.new("CMYK", (1, 1), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)


def test_resize_center_crop() -> None:
    wide = np.zeros((10, 30, 3), dtype=np.uint8)
    wide[:, 10:20] = 255  # white centre third, black sides
    out = resize_center_crop(Image.fromarray(wide), 10)
    assert out.size == (10, 10) and np.asarray(out).min() == 255
    assert resize_center_crop(Image.new("RGB", (5, 9)), 4).size == (4, 4)
    same = Image.new("RGB", (4, 4))
    assert resize_center_crop(same, 4) is same


# ---------------------------------------------------------------- split


def test_split_counts_disjoint_deterministic() -> None:
    labels = np.repeat(np.arange(5), [10, 12, 8, 20, 7])
    s = split_dataset(labels, val_per_class=2, calib_per_class=3, seed=1)
    for part, per_class in ((s.val, 2), (s.calib, 3)):
        assert part.dtype == np.int64
        assert np.bincount(labels[part], minlength=5).tolist() == [per_class] * 5
    assert np.bincount(labels[s.train]).tolist() == [5, 7, 3, 15, 2]
    all_idx = np.concatenate([s.train, s.calib, s.val])
    assert len(np.unique(all_idx)) == len(labels) == len(all_idx)

    again = split_dataset(labels, 2, 3, seed=1)
    assert all(
        np.array_equal(a, b)
        for a, b in zip(again.__dict__.values(), s.__dict__.values(), strict=True)
    )
    other = split_dataset(labels, 2, 3, seed=2)
    assert not np.array_equal(other.val, s.val)


def test_split_pinned_values() -> None:
    # default_rng(PCG64) streams are stable across platforms and numpy versions: pin a result
    s = split_dataset(np.array([0, 0, 0, 1, 1, 1, 1]), val_per_class=1, calib_per_class=1, seed=7)
    assert (s.val.tolist(), s.calib.tolist(), s.train.tolist()) == ([0, 5], [2, 3], [1, 4, 6])


def test_split_too_few() -> None:
    labels = np.array([0, 0, 0, 0, 1, 1, 1])
    with pytest.raises(ValueError, match=r"class 1 has 3 images but needs 4"):
        split_dataset(labels, val_per_class=2, calib_per_class=1, seed=0)


# ---------------------------------------------------------------- augment / to_tensor


def _ramp(b: int, h: int, w: int) -> torch.Tensor:
    """Images whose pixels are all distinct within an image, so any shift is visible."""
    base = torch.arange(h * w * 3, dtype=torch.int64).reshape(h, w, 3) % 251
    return torch.stack([(base + i) % 251 for i in range(b)]).to(torch.uint8)


def test_augment_shape_and_identity() -> None:
    x = _ramp(8, 12, 10)
    out = augment_batch(x, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert torch.equal(augment_batch(x, pad=0, flip=False), x)


def _crop(img: np.ndarray, dy: int, dx: int, h: int, w: int, flip: bool) -> np.ndarray:
    out = img[dy : dy + h, dx : dx + w]
    return out[:, ::-1] if flip else out


def test_augment_is_reflect_crop_or_flip() -> None:
    x = _ramp(32, 9, 11)
    pad = 2
    out = augment_batch(x, pad=pad, flip=True, generator=torch.Generator().manual_seed(3))
    shifts, flips = set(), set()
    for img, aug in zip(x.numpy(), out.numpy(), strict=True):
        padded = np.pad(img, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
        matches = [
            (dy, dx, f)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            for f in (False, True)
            if np.array_equal(aug, _crop(padded, dy, dx, 9, 11, f))
        ]
        assert len(matches) == 1
        shifts.add(matches[0][:2])
        flips.add(matches[0][2])
    assert len(shifts) > 5 and flips == {
        False,
        True,
    }  # content actually moves, both flip states occur

    again = augment_batch(x, pad=pad, flip=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(out, again)


def test_random_resized_crop_full_box_is_identity_or_mirror() -> None:
    x = _ramp(6, 8, 8).permute(0, 3, 1, 2).float()  # (B, 3, H, W)
    assert torch.equal(random_resized_crop(x, min_area=1.0, flip=False), x)
    out = random_resized_crop(x, min_area=1.0, ratio=(1.0, 1.0), flip=True,
                              generator=torch.Generator().manual_seed(0))
    mirrored = [torch.allclose(o, i.flip(-1), atol=1e-4) for o, i in zip(out, x, strict=True)]
    kept = [torch.allclose(o, i, atol=1e-4) for o, i in zip(out, x, strict=True)]
    assert all(m or k for m, k in zip(mirrored, kept, strict=True))
    assert any(mirrored) and any(kept)


def test_random_resized_crop_zooms_in_and_is_seeded() -> None:
    # a horizontal ramp: a box of a fraction of the width shows a proportionally smaller range
    ramp = torch.linspace(0, 1, 32).expand(16, 3, 32, 32).contiguous()
    out = random_resized_crop(ramp, min_area=0.25, size=24, flip=False, ratio=(1.0, 1.0),
                              generator=torch.Generator().manual_seed(1))
    assert out.shape == (16, 3, 24, 24)
    spans = out[:, 0, 0, -1] - out[:, 0, 0, 0]
    assert bool((spans < 1.0).all()) and float(spans.min()) < 0.75  # zoomed, by varying amounts
    assert bool((out >= -1e-6).all() and (out <= 1 + 1e-6).all())  # stays inside the image
    again = random_resized_crop(ramp, min_area=0.25, size=24, flip=False, ratio=(1.0, 1.0),
                                generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again)
    with pytest.raises(ValueError, match="min_area"):
        random_resized_crop(ramp, min_area=0.0)


def test_to_tensor_exact() -> None:
    x = np.array([[[[0, 51, 255], [255, 255, 255]]]], dtype=np.uint8)  # (1, 1, 2, 3)
    mean, std = (0.5, 0.25, 0.0), (0.5, 2.0, 1.0)
    t = to_tensor(x, mean, std)
    assert t.shape == (1, 3, 1, 2) and t.dtype == torch.float32
    assert t[0, :, 0, 0].tolist() == [-1.0, pytest.approx((0.2 - 0.25) / 2.0, abs=1e-7), 1.0]
    assert t[0, :, 0, 1].tolist() == [1.0, 0.375, 1.0]
    expected = (x.astype(np.float32) / 255.0 - np.float32(mean)) / np.float32(
        std
    )  # serving's numpy way
    assert np.array_equal(t.numpy(), expected.transpose(0, 3, 1, 2))
    assert torch.equal(to_tensor(torch.from_numpy(x), mean, std), t)


# ---------------------------------------------------------------- synthetic


def _synthetic(seed: int = 0, **kw: int) -> ImageSet:
    return load_dataset(DataConfig(kind="synthetic", seed=seed, **kw))


def test_synthetic_shapes_and_determinism() -> None:
    ds = _synthetic(synthetic_superclasses=3, synthetic_classes_per_super=2, synthetic_per_class=10)
    assert ds.images.shape == (60, 32, 32, 3) and ds.images.dtype == np.uint8
    assert np.bincount(ds.labels).tolist() == [10] * 6 and ds.labels.dtype == np.int64
    assert ds.class_ids[:3] == ["s0c0", "s0c1", "s1c0"] and ds.class_names[1] == "super0-class1"
    assert ds.name == "synthetic-3x2"
    same = _synthetic(
        synthetic_superclasses=3, synthetic_classes_per_super=2, synthetic_per_class=10
    )
    assert np.array_equal(ds.images, same.images)
    other = _synthetic(
        1, synthetic_superclasses=3, synthetic_classes_per_super=2, synthetic_per_class=10
    )
    assert not np.array_equal(ds.images, other.images)
    assert _synthetic(image_size=20, synthetic_per_class=2).images.shape == (24, 20, 20, 3)


def test_synthetic_hierarchy_in_pixels() -> None:
    """Class means of one super-class are closer to each other than to any other super-class's."""
    ds = _synthetic()
    m = 3  # default classes per super-class
    means = np.stack(
        [
            ds.images[ds.labels == c].reshape((ds.labels == c).sum(), -1).mean(0)
            for c in range(ds.num_classes)
        ]
    )
    dist = np.linalg.norm(means[:, None] - means[None], axis=-1)
    sup = np.arange(ds.num_classes) // m
    same = sup[:, None] == sup[None]
    off_diag = ~np.eye(ds.num_classes, dtype=bool)
    assert dist[same & off_diag].max() < dist[~same].min()


def test_parallel_decode_matches_serial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _make_folder(tmp_path / "shapes")
    cfg = DataConfig(kind="folder", path=str(root), image_size=8, cache_dir="")
    serial = load_dataset(cfg)
    monkeypatch.setattr(imageset_mod, "_PARALLEL_MIN", 1)  # force the process pool
    monkeypatch.setattr(imageset_mod, "_CHUNK", 2)  # several chunks, to check their order
    monkeypatch.setattr(imageset_mod, "available_cpus", lambda: 2)
    assert np.array_equal(load_dataset(cfg).images, serial.images)
