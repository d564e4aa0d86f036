"""tf.data pipelines on records written with ``encode_example`` from synthetic photographs."""

import numpy as np
import pytest
import tensorflow as tf

from drkeras import keys
from drkeras.data import pipeline, records, synthetic

SIZE = 64
# grades of the 12 training examples: skewed like real data, one unknown
GRADES = [0, 0, 0, 0, 0, -1, 1, 1, 2, 3, 4, 4]
ALL = [True] * 5
NO_SE = [True, True, True, False, True]
NONE = [False] * 5
PRESENT = [ALL] * 8 + [NO_SE] * 2 + [NONE] * 2


def _write_split(root, split, grades, present, seed):
    examples = []
    with records.ShardWriter(root, split, examples_per_shard=5) as writer:
        for i, (grade, flags) in enumerate(zip(grades, present)):
            f = synthetic.generate(seed + i, size=SIZE, grade=max(grade, 0), camera="square")
            masks = f.masks * np.array(flags, np.uint8)
            ex = dict(
                id=f"syn-{split}-{i:02d}",
                image=f.image,
                masks=masks,
                mask_present=flags,
                grade=grade,
                dme=f.dme,
            )
            writer.write(records.encode_example(dataset="syn", split=split, lossless=True, **ex))
            examples.append(ex)
    return examples


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("records") / "syn"
    train = _write_split(root, "train", GRADES, PRESENT, seed=10)
    val = _write_split(root, "val", [1, 2, 0, 3], [ALL, NONE, ALL, NONE], seed=50)
    return root, train, val


def _plain(**kwargs):
    """Arguments that make a pipeline the identity on these 64 px records."""
    base = dict(size=SIZE, fov_crop=False, shuffle=False, augment=False, batch_size=100)
    base.update(kwargs)
    return base


def _first(ds):
    return tf.nest.map_structure(lambda t: t.numpy(), next(iter(ds)))


def test_segmentation_elements_equal_the_records(data):
    root, train, _ = data
    ds = pipeline.segmentation_dataset(root, "train", lesions=("EX", "MA"), **_plain())
    images, targets = _first(ds)
    kept = [ex for ex in train if any(ex["mask_present"])]
    assert images.shape == (10, SIZE, SIZE, 3) and images.dtype == np.float32
    assert targets[keys.MASKS].shape == (10, SIZE, SIZE, 2)
    for i, ex in enumerate(kept):
        np.testing.assert_allclose(images[i], ex["image"] / 255.0, atol=1e-6)
        np.testing.assert_array_equal(targets[keys.MASKS][i, ..., 0], ex["masks"][..., 2])
        np.testing.assert_array_equal(targets[keys.MASKS][i, ..., 1], ex["masks"][..., 0])
        np.testing.assert_array_equal(
            targets[keys.MASK_PRESENT][i], np.array(ex["mask_present"], np.float32)[[2, 0]]
        )


def test_merged_lesions_are_the_union_and_known_only_when_all_are_annotated(data):
    root, train, _ = data
    ds = pipeline.segmentation_dataset(
        root, "train", lesions=("MA", "HE", "EX", "SE"), merge_lesions=True, **_plain()
    )
    _, targets = _first(ds)
    assert targets[keys.MASKS].shape[-1] == 1
    for i, ex in enumerate(train[:10]):
        union = ex["masks"][..., :4].max(axis=-1)
        np.testing.assert_array_equal(targets[keys.MASKS][i, ..., 0], union)
        assert targets[keys.MASK_PRESENT][i, 0] == float(all(ex["mask_present"][:4]))


def test_grading_labels_in_record_order_without_unknown_grades(data):
    root, train, _ = data
    images, grades = _first(pipeline.grading_dataset(root, "train", **_plain()))
    assert grades.dtype == np.int32
    assert grades.tolist() == [g for g in GRADES if g >= 0]
    _, dme = _first(pipeline.grading_dataset(root, "train", label=keys.DME, **_plain()))
    assert dme.tolist() == [ex["dme"] for ex in train]
    _, low = _first(pipeline.grading_dataset(root, "train", num_classes=2, **_plain()))
    assert low.tolist() == [0, 0, 0, 0, 0, 1, 1]
    with pytest.raises(ValueError, match="label must be"):
        pipeline.grading_dataset(root, "train", label="stage")


def test_class_balanced_sampling_draws_every_grade_equally(data):
    root, _, _ = data
    ds = pipeline.grading_dataset(
        root, "train", size=16, batch_size=50, class_balanced=True, seed=3, shuffle=True
    )
    drawn = np.concatenate([g.numpy() for _, g in ds.take(20)])
    share = np.bincount(drawn, minlength=5) / len(drawn)
    # the records hold 5/2/1/1/2 examples of grades 0-4
    np.testing.assert_allclose(share, 0.2, atol=0.05)
    plain = np.array([g for g in GRADES if g >= 0])
    assert np.bincount(plain, minlength=5)[0] / len(plain) > 0.4


def test_augmented_pipeline_is_reproducible_and_keeps_masks_on_their_lesions(data):
    root, _, _ = data
    kwargs = dict(size=SIZE, batch_size=4, augment=True, repeat=True, fov_crop=False)
    a = _first(pipeline.segmentation_dataset(root, "train", seed=1, **kwargs))
    b = _first(pipeline.segmentation_dataset(root, "train", seed=1, **kwargs))
    c = _first(pipeline.segmentation_dataset(root, "train", seed=2, **kwargs))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1][keys.MASKS], b[1][keys.MASKS])
    assert not np.array_equal(a[0], c[0])
    ds = pipeline.segmentation_dataset(root, "train", seed=4, **kwargs)
    for images, targets in ds.take(5):
        images, masks = images.numpy(), targets[keys.MASKS].numpy()
        assert 0.0 <= images.min() and images.max() <= 1.0
        assert set(np.unique(masks)) <= {0.0, 1.0}
        for image, mask in zip(images, masks):
            grey = image.mean(axis=-1)
            disc = mask[..., 4] > 0
            assert disc.sum() > 0
            # the disc mask still sits on the bright disc after the paired augmentation
            assert grey[disc].mean() > grey[(grey > 0.05) & ~disc].mean() + 0.1


def test_epochs_get_new_augmentations_and_crops_have_the_crop_size(data):
    root, train, _ = data
    ds = pipeline.grading_dataset(
        root, "val", size=SIZE, batch_size=4, augment=True, repeat=True, shuffle=False
    )
    it = iter(ds)
    first, second = next(it)[0].numpy(), next(it)[0].numpy()
    assert not np.allclose(first, second)  # the same 4 images, drawn again differently
    ds = pipeline.segmentation_dataset(root, "train", crop_size=48, **_plain())
    images, targets = _first(ds)
    assert images.shape[1:] == (48, 48, 3) and targets[keys.MASKS].shape[1:3] == (48, 48)
    np.testing.assert_allclose(images[0], train[0]["image"][8:56, 8:56] / 255.0, atol=1e-6)
    with pytest.raises(ValueError, match="crop_size"):
        pipeline.segmentation_dataset(root, "train", crop_size=80, **_plain())


def test_mixed_batches_flag_which_examples_have_valid_masks(data):
    root, train, val = data
    _, targets = _first(pipeline.mixed_dataset(root, "train", **_plain()))
    assert targets[pipeline.MASK_VALID].tolist() == [float(any(e["mask_present"])) for e in train]
    assert targets[keys.GRADE].tolist() == GRADES
    hidden = pipeline.mixed_dataset(root, "train", mask_ids=["syn-train-01"], **_plain())
    _, targets = _first(hidden)
    assert np.flatnonzero(targets[pipeline.MASK_VALID]).tolist() == [1]
    assert targets[keys.MASKS][[0, 2, 3]].max() == 0.0
    np.testing.assert_array_equal(targets[keys.MASKS][1], train[1]["masks"])

    ds = pipeline.mixed_dataset(
        root,
        "train",
        image_level_dir=root,
        image_level_split="val",
        pixel_fraction=0.5,
        size=32,
        batch_size=16,
        repeat=True,
        seed=5,
    )
    valid = np.concatenate([t[pipeline.MASK_VALID].numpy() for _, t in ds.take(8)])
    assert 0.35 < valid.mean() < 0.65
    # image-level examples never carry masks
    for _, t in ds.take(2):
        image_level = t[pipeline.MASK_VALID].numpy() == 0
        assert t[keys.MASKS].numpy()[image_level].max(initial=0.0) == 0.0
    with pytest.raises(ValueError, match="pixel_fraction"):
        pipeline.mixed_dataset(root, "train", pixel_fraction=1.0)


def test_two_streams_have_k_times_more_classifier_images(data):
    root, _, _ = data
    ds = pipeline.two_stream_dataset(
        root, "train", root, "train", seg_batch_size=2, ratio=3, size=32, augment=True
    )
    inputs, targets = _first(ds)
    assert inputs[pipeline.SEG_IMAGE].shape == (2, 32, 32, 3)
    assert inputs[pipeline.CLS_IMAGE].shape == (6, 32, 32, 3)
    assert targets[keys.MASKS].shape == (2, 32, 32, 5)
    assert targets[keys.GRADE].shape == (6,) and targets[keys.GRADE].min() >= 0


def test_two_streams_take_per_stream_options_over_the_common_ones(data):
    root, _, _ = data
    common = dict(size=SIZE, fov_crop=False, augment=False, shuffle=False, repeat=False)
    ds = pipeline.two_stream_dataset(
        root, "train", root, "train", seg_batch_size=1, ratio=2,
        cls_options={"normalization": "standardize"}, **common,
    )  # fmt: skip
    inputs, _ = _first(ds)
    seg_alone, _ = _first(pipeline.segmentation_dataset(root, "train", batch_size=1, **common))
    np.testing.assert_array_equal(inputs[pipeline.SEG_IMAGE], seg_alone)  # "unit" as common
    cls = inputs[pipeline.CLS_IMAGE]  # standardised per image: mean 0, std 1
    np.testing.assert_allclose(cls.mean(axis=(1, 2, 3)), 0.0, atol=1e-4)
    np.testing.assert_allclose(cls.std(axis=(1, 2, 3)), 1.0, atol=1e-2)


def test_patch_dataset_labels_match_a_numpy_reference(data):
    root, train, _ = data
    kwargs = dict(image_size=SIZE, grid=8, patch_size=4, fov_crop=False, shuffle=False)
    ds = pipeline.patch_dataset(root, "train", batch_size=64, **kwargs)
    labelled = [ex for ex in train if all(ex["mask_present"][:4])]
    for (patch_batch, labels), ex in zip(ds, labelled):
        union = ex["masks"][..., :4].max(axis=-1)
        expected = union.reshape(8, 8, 8, 8).transpose(0, 2, 1, 3).reshape(64, -1).max(axis=1)
        np.testing.assert_array_equal(labels.numpy(), expected)
        # normalised by the image maximum, then each 8 px patch area-averaged to 4 px
        scaled = ex["image"] / ex["image"].max()
        blocks = scaled.reshape(8, 4, 2, 8, 4, 2, 3).mean(axis=(2, 5))
        expected_patches = blocks.transpose(0, 2, 1, 3, 4).reshape(64, 4, 4, 3)
        np.testing.assert_allclose(patch_batch.numpy(), expected_patches, atol=1e-5)
    images = pipeline.patch_dataset(root, "train", mode="images", batch_size=100, **kwargs)
    grids, targets = _first(images)
    assert grids.shape == (len(labelled), 64, 4, 4, 3)
    assert targets[pipeline.IMAGE_LABEL].tolist() == [
        int(ex["masks"][..., :4].any()) for ex in labelled
    ]
    unlabelled = pipeline.patch_dataset(
        root, "train", mode="images", labeled=False, batch_size=100, **kwargs
    )
    grids, targets = _first(unlabelled)
    assert grids.shape[0] == len(train) and set(targets[pipeline.PATCH_LABELS].ravel()) == {-1}
    assert targets[pipeline.IMAGE_LABEL].tolist() == [-1 if g < 0 else int(g > 0) for g in GRADES]
    jittered = pipeline.patch_dataset(root, "train", batch_size=64, augment=True, **kwargs)
    assert _first(jittered)[0].shape == (64, 4, 4, 3)


def test_read_labels_and_deterministic_splits(data):
    root, train, _ = data
    labels = pipeline.read_labels(root, "train")
    assert labels[keys.ID].tolist() == [ex["id"] for ex in train]
    assert labels[keys.GRADE].tolist() == GRADES
    np.testing.assert_array_equal(labels[keys.MASK_PRESENT], np.array(PRESENT))

    ids = labels[keys.ID].tolist()
    folds = [pipeline.kfold_split(ids, 3, k, seed=7) for k in range(3)]
    held = [set(h) for _, h in folds]
    assert set().union(*held) == set(ids) and sum(map(len, held)) == len(ids)
    for train_ids, held_ids in folds:
        assert set(train_ids).isdisjoint(held_ids) and len(held_ids) == 4
    assert pipeline.kfold_split(ids[::-1], 3, 1, seed=7) == folds[1]  # order does not matter
    assert pipeline.kfold_split(ids, 3, 1, seed=8) != folds[1]
    grades = labels[keys.GRADE].tolist()
    zeros = {i for i, g in zip(ids, grades) if g == 0}
    for k in range(3):
        _, held_ids = pipeline.kfold_split(ids, 3, k, seed=1, stratify=grades)
        assert len(zeros & set(held_ids)) in (1, 2)  # 5 grade-0 ids spread over 3 folds

    small, _ = pipeline.fraction_split(ids, 0.25, seed=2)
    large, rest = pipeline.fraction_split(ids, 0.5, seed=2)
    assert len(small) == 3 and len(large) == 6 and set(small) <= set(large)
    assert set(large).isdisjoint(rest) and len(rest) == 6
    assert len(pipeline.fraction_split(ids, 0.01)[0]) == 1
    strat, _ = pipeline.fraction_split(ids, 0.5, seed=0, stratify=[g == 0 for g in grades])
    assert len(zeros & set(strat)) in (2, 3)
    with pytest.raises(ValueError, match="k >= 2"):
        pipeline.kfold_split(ids, 3, 3)


def test_id_filters_and_max_examples(data):
    root, train, _ = data
    keep = [train[1]["id"], train[7]["id"]]
    _, grades = _first(pipeline.grading_dataset(root, "train", ids=keep, **_plain()))
    assert grades.tolist() == [GRADES[1], GRADES[7]]
    _, grades = _first(
        pipeline.grading_dataset(root, "train", exclude_ids=[train[0]["id"]], **_plain())
    )
    assert len(grades) == 10
    _, grades = _first(pipeline.grading_dataset(root, "train", max_examples=3, **_plain()))
    assert grades.tolist() == [0, 0, 0]


def test_sharding_per_input_pipeline_and_distribution(data, two_replicas):
    root, train, _ = data
    seen = []
    for index in range(2):
        context = tf.distribute.InputContext(
            num_input_pipelines=2, input_pipeline_id=index, num_replicas_in_sync=2
        )
        ds = pipeline.mixed_dataset(root, "train", input_context=context, **_plain(batch_size=8))
        batches = list(ds)
        assert max(len(t[keys.GRADE]) for _, t in batches) <= 4  # per-replica batch 8 / 2
        seen.append(np.concatenate([t[keys.GRADE].numpy() for _, t in batches]))
    assert sorted(np.concatenate(seen).tolist()) == sorted(GRADES)
    options = pipeline.distribution_options()
    assert options.experimental_distribute.auto_shard_policy == (
        tf.data.experimental.AutoShardPolicy.DATA
    )

    def dataset_fn(context):
        return pipeline.grading_dataset(
            root, "train", size=16, batch_size=4, repeat=True, input_context=context
        )

    dist = two_replicas.distribute_datasets_from_function(dataset_fn)
    images, grades = next(iter(dist))
    per_replica = two_replicas.experimental_local_results(images)
    assert len(per_replica) == 2 and all(x.shape == (2, 16, 16, 3) for x in per_replica)


def test_file_cache_and_clear_errors(data, tmp_path):
    root, _, _ = data
    cache = tmp_path / "cache" / "grading"
    cache.parent.mkdir()
    ds = pipeline.grading_dataset(root, "val", cache=str(cache), **_plain())
    first = _first(ds)
    assert list(cache.parent.glob("grading*"))
    np.testing.assert_array_equal(_first(ds)[0], first[0])
    with pytest.raises(ValueError, match="lesions must be a non-empty subset"):
        pipeline.segmentation_dataset(root, "train", lesions=("XX",))
    with pytest.raises(FileNotFoundError, match="no test-NNNNN.tfrecord shards"):
        pipeline.grading_dataset(root, "test")


def test_mixed_streams_cache_to_their_own_files(data, tmp_path):
    root, _, _ = data
    options = dict(image_level_dir=root, image_level_split="val", pixel_fraction=0.5)
    ds = pipeline.mixed_dataset(
        root, "train", size=32, batch_size=4, cache=str(tmp_path / "mixed"), **options
    )
    # two streams writing one file fail (a concurrent caching iterator's lock file)
    first = np.concatenate([t[pipeline.MASK_VALID].numpy() for _, t in ds])
    again = np.concatenate([t[pipeline.MASK_VALID].numpy() for _, t in ds])  # from the files
    assert len(first) and len(again)
    names = sorted({p.name.split(".")[0] for p in tmp_path.glob("mixed_*")})
    assert names == ["mixed_image", "mixed_other", "mixed_pixel"]
