"""Export an inference network as a self-contained SavedModel (docs/design.md section 3, "Export").

:func:`export_model` wraps a functional Keras model in a ``tf.Module`` with two serving
signatures that apply the SAME preprocessing as training (``drkeras.data.preprocess``):

- ``serving_default(images)``: uint8 RGB images ``[B, H, W, 3]`` of any ``H, W`` (one size per
  batch);
- ``serve_bytes(encoded)``: encoded JPEG/PNG strings ``[B]`` (images of different sizes may be
  mixed).

Both return a dict of named float32 outputs (``grade_probs``, ``lesion_probs``, ... from
``drkeras.keys``) and two input-quality outputs (:data:`QUALITY_OUTPUTS`, computed by
:mod:`drkeras.data.quality` on the photograph as received): ``fov_fraction`` (float32 ``[B]``,
the share of the photograph in the detected field of view) and ``quality`` (string ``[B]``,
``"ok"`` or the flags joined by ``";"``: ``too_small``, ``no_fov``, ``uniform``, ``no_colour``;
``serve_bytes`` also ``truncated`` and ``bit_depth_converted``, which need the encoded file).
``serve_bytes`` decodes a truncated JPEG as far as it goes (grey below) and flags it
``truncated`` rather than failing the whole batch. Dense outputs (segmentation maps, attention
maps) are returned at the MODEL's resolution (``image_size x image_size``, of the preprocessed,
FOV-cropped image), not at the resolution of the input photograph: :func:`masks_for_model`
brings record masks to that frame, :func:`uncrop_dense` puts a dense output back into the
resized field of view.

The input transform (:func:`serving_input`) is the EVALUATION transform of the training
pipelines (:mod:`drkeras.data.pipeline`): field-of-view crop, resize of its box to
``preprocess["resize_size"]`` (default ``image_size``), optionally the pipelines' uint8
rounding of the resized image (``quantize``), the central ``image_size`` crop, Graham,
normalisation. An experiment that trains on random crops of a larger resize (the
cooperative-learning paper: 224 of 256) exports ``resize_size=256`` and ``image_size=224``, so
the served model sees lesions at the scale it was trained and evaluated on.

The SavedModel also holds ``drkeras_meta``, a JSON string with the preprocessing arguments,
input size, output names/shapes and channel names, so ``python -m drkeras.evaluate`` and other
readers need nothing but the folder. After every export a reload-and-compare check
(:func:`verify_export`) runs; its report is logged, written to
``<export>/assets.extra/export_check.json`` and a mismatch raises :class:`ExportMismatch`.

Example::

    path = export_model(model, run_dir / "export" / "mtunet", image_size=512,
                        preprocess={"fov_crop": True, "graham": False, "normalization": "unit"},
                        output_names=[keys.GRADE_PROBS, keys.SEG_PROBS])
    exported = load_exported(path)
    outputs = exported.predict(uint8_images)          # {"grade_probs": ..., "seg_probs": ...}
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import pathlib
import shutil
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import tensorflow as tf

from drkeras import keys
from drkeras.data import quality

__all__ = [
    "ExportMismatch",
    "ExportedModel",
    "META_FORMAT",
    "PATCH_EXPORT_FILE",
    "QUALITY_OUTPUTS",
    "default_channels",
    "export_model",
    "load_exported",
    "masks_for_model",
    "model_frame",
    "pipeline_preprocess",
    "serving_batch",
    "serving_input",
    "uncrop_dense",
    "verify_export",
]

log = logging.getLogger("drkeras")

META_FORMAT = "drkeras-export/1"
CHECK_FILE = pathlib.Path("assets.extra") / "export_check.json"
# A SavedModel that serves prepared patches, not photographs (the SSL-GAN's patch classifier):
# its metadata, readable without loading it. Tools for photographs (evaluate, leaderboard) refuse
# or leave out such exports.
PATCH_EXPORT_FILE = pathlib.Path("assets.extra") / "patch_export.json"
TOLERANCE = 1e-4
# Input-quality outputs every signature returns besides the model's (drkeras.data.quality).
FOV_FRACTION = "fov_fraction"
QUALITY = "quality"
QUALITY_OUTPUTS = (FOV_FRACTION, QUALITY)

# Channel specification: one (channel name, record lesion types) pair per output channel.
# A channel made of several types is their union (MTUnet's "red" = MA + HE); no type = background.
ChannelSpec = Sequence[Tuple[str, Sequence[str]]]


class ExportMismatch(RuntimeError):
    """The reloaded SavedModel does not reproduce the Keras model's outputs."""


def _preprocess_module():
    try:
        from drkeras.data import preprocess
    except ImportError as err:  # pragma: no cover - only before drkeras.data.preprocess exists
        raise ImportError(
            f"drkeras.export needs drkeras.data.preprocess (prepare_image/prepare_batch): {err}"
        ) from err
    return preprocess


# preprocess keys of the export beyond prepare_image's (fov_crop, graham, normalization)
EXPORT_PREPROCESS = ("resize_size", "quantize")


def serving_input(
    image_uint8,
    *,
    size: int,
    resize_size: Optional[int] = None,
    quantize: bool = False,
    fov_crop: bool = True,
    graham: bool = False,
    normalization: str = "unit",
) -> tf.Tensor:
    """The model input the export computes from one photograph: the evaluation transform of
    :mod:`drkeras.data.pipeline` (``augment=False``).

    Field-of-view box (or the whole frame), its resize to ``resize_size`` (``crop_and_resize``,
    aspect kept, zero-padded square), with ``quantize`` the pipelines' rounding of that image
    to uint8 (their cache stores it so), the central ``size`` crop when ``resize_size >
    size`` (:func:`drkeras.data.augment.center_crop`), Graham, normalisation: the pipelines'
    ``_decode_resize`` then ``_augment_stage``. With the defaults it is
    :func:`drkeras.data.preprocess.prepare_image`.

    Args:
        image_uint8: ``[H, W, 3]`` uint8 RGB.
        size: the model's input side.
        resize_size: the side the box is resized to before the central crop (``None``:
            ``size``, no crop).
        quantize: round the resized image to uint8 as the record pipelines do.
        fov_crop, graham, normalization: as :func:`drkeras.data.preprocess.prepare_image`.

    Returns:
        float32 ``[size, size, 3]``.

    Example::

        >>> import numpy as np
        >>> serving_input(np.zeros((40, 60, 3), np.uint8), size=14, resize_size=16).shape
        TensorShape([14, 14, 3])
    """
    prep = _preprocess_module()
    from drkeras.data import augment

    prep._check_mode(normalization)
    frame = int(resize_size or size)
    if frame < int(size):
        raise ValueError(f"resize_size={frame} must be at least the model input size {size}")
    image = tf.convert_to_tensor(image_uint8)
    box = prep.fov_box(image) if fov_crop else prep._full_box(image)
    x = prep.crop_and_resize(image, box, frame)
    if quantize:
        x = tf.cast(tf.cast(tf.round(x), tf.uint8), tf.float32)
    if frame != int(size):
        x, _ = augment.center_crop(x, None, int(size))
    x = tf.ensure_shape(x, [int(size), int(size), 3])
    if graham:
        x = prep.graham(x)
    return prep.normalize(x, normalization)


def pipeline_preprocess(
    *,
    fov_crop: bool,
    graham: bool,
    normalization: str,
    resize_size: Optional[int] = None,
) -> dict:
    """The export ``preprocess`` of a model evaluated on :mod:`drkeras.data.pipeline`'s
    segmentation / grading / mixed datasets: their options plus ``quantize=True``, because
    those pipelines round the resized field of view to uint8 (their cache stores it so) before
    Graham and normalisation. (:func:`drkeras.data.pipeline.patch_dataset` does not round: an
    export of a patch-grid model passes ``quantize=False``.)

    What the export cannot reproduce: grading records (no masks) of large JPEGs are decoded
    already scaled down by 2, 4 or 8 (:func:`drkeras.data.records.parse_example` ``min_side``),
    while the export decodes (and ``serving_default`` receives) the photograph at full size,
    as segmentation records are decoded. README's export section gives the measured size of
    that difference.

    Example::

        >>> pipeline_preprocess(fov_crop=True, graham=False, normalization="unit")["quantize"]
        True
    """
    out = {
        "fov_crop": bool(fov_crop),
        "graham": bool(graham),
        "normalization": str(normalization),
        "quantize": True,
    }
    if resize_size is not None:
        out["resize_size"] = int(resize_size)
    return out


def serving_batch(images_uint8, *, size: int, **preprocess) -> tf.Tensor:
    """:func:`serving_input` over a batch ``[B, H, W, 3]`` (one FOV box per image)."""
    images = tf.convert_to_tensor(images_uint8)
    return tf.map_fn(
        lambda image: serving_input(image, size=size, **preprocess),
        images,
        fn_output_signature=tf.TensorSpec([int(size), int(size), 3], tf.float32),
    )


def model_frame(meta: Mapping) -> Tuple[int, int]:
    """``(resize_size, image_size)`` of an export's metadata: the side the field of view is
    resized to, and the side of its central window the model sees (equal without a crop)."""
    size = int(meta["image_size"])
    return int(meta["preprocess"].get("resize_size") or size), size


def masks_for_model(masks, box, meta: Mapping) -> np.ndarray:
    """Record masks ``[H, W, K]`` in the model's frame ``[S, S, K]`` (nearest neighbour): the
    crop-and-resize of :func:`serving_input` with ``box`` (the photograph's FOV box, or the
    whole frame), then its central crop."""
    from drkeras.data import augment

    frame, size = model_frame(meta)
    out = _preprocess_module().prepare_example_masks(masks, box, frame)
    if frame != size:
        out, _ = augment.center_crop(out, None, size)
    return np.asarray(out)


def uncrop_dense(dense, meta: Mapping) -> np.ndarray:
    """A dense output ``[S', S'(, C)]`` put back into the resized field of view: a map of the
    whole ``resize_size`` frame at the output's scale, zero outside the central window the model
    saw (the identity for an export without a crop); then
    :func:`drkeras.predict.map_to_photo` maps it onto the photograph."""
    dense = np.asarray(dense, np.float32)
    frame, size = model_frame(meta)
    if frame == size:
        return dense
    scale = dense.shape[0] / size
    full = int(round(frame * scale))
    start = int(round(((frame - size) // 2) * scale))
    out = np.zeros((full, full) + dense.shape[2:], np.float32)
    out[start : start + dense.shape[0], start : start + dense.shape[1]] = dense
    return out


def default_channels(output_name: str, num_channels: int) -> Optional[list]:
    """The channel spec assumed when the exporter is not told one.

    ``lesion_probs`` with C channels: the first C record lesion types (``keys.LESIONS``), one
    each. Other outputs: ``None`` (not comparable with the record masks without a spec).
    """
    if output_name == keys.LESION_PROBS and num_channels <= keys.NUM_LESIONS:
        return [[name, [name]] for name in keys.LESIONS[:num_channels]]
    return None


def _select_outputs(available: Sequence[str], output_names) -> Dict[str, str]:
    """``{serving name: model output name}`` from a list of names or an explicit mapping."""
    available = list(available)
    if output_names is None:
        mapping = {n: n for n in available}
    elif isinstance(output_names, Mapping):
        mapping = {str(k): str(v) for k, v in output_names.items()}
    else:
        mapping = {str(n): str(n) for n in output_names}
    unknown = [v for v in mapping.values() if v not in available]
    if unknown or not mapping:
        raise ValueError(
            f"export_model: output(s) {unknown or '(none)'} not among the model's outputs "
            f"{available}; pass names from that list, or a mapping "
            "{serving_name: model_output_name}"
        )
    return mapping


def _model_outputs(model: tf.keras.Model, x) -> Dict[str, tf.Tensor]:
    out = model(x, training=False)
    if isinstance(out, Mapping):
        return dict(out)
    if not isinstance(out, (list, tuple)):
        out = [out]
    return dict(zip(model.output_names, out))


class _ServingModule(tf.Module):
    """The exported object: the Keras model, its metadata and the two serving functions."""

    def __init__(self, model, image_size: int, preprocess: dict, mapping: dict, meta_json: str):
        super().__init__(name="drkeras_export")
        self.model = model
        self.drkeras_meta = tf.Variable(meta_json, trainable=False, name="drkeras_meta")
        size = int(image_size)
        kwargs = dict(preprocess)
        names = dict(mapping)

        def run(x, fov, flags, flag_names):
            outputs = _model_outputs(model, x)
            out = {k: tf.cast(outputs[v], tf.float32) for k, v in names.items()}
            out[FOV_FRACTION] = fov
            out[QUALITY] = tf.map_fn(
                lambda f: quality.join_flags(f, flag_names),
                flags,
                fn_output_signature=tf.TensorSpec([], tf.string),
            )
            return out

        def pixel_quality(image):
            measures = quality.pixel_measures(image)
            return measures["fov_fraction"], quality.pixel_flags(measures)

        def serve(images):
            fov, flags = tf.map_fn(
                pixel_quality,
                images,
                fn_output_signature=(
                    tf.TensorSpec([], tf.float32),
                    tf.TensorSpec([len(quality.PIXEL_FLAGS)], tf.bool),
                ),
            )
            return run(serving_batch(images, size=size, **kwargs), fov, flags, quality.PIXEL_FLAGS)

        def decode_one(encoded):
            image = tf.ensure_shape(decode_photo(encoded), [None, None, 3])
            fov, flags = pixel_quality(image)
            flags = tf.concat([quality.encoded_flags(encoded), flags], axis=0)
            return serving_input(image, size=size, **kwargs), fov, flags

        def serve_bytes(encoded):
            x, fov, flags = tf.map_fn(
                decode_one,
                encoded,
                fn_output_signature=(
                    tf.TensorSpec([size, size, 3], tf.float32),
                    tf.TensorSpec([], tf.float32),
                    tf.TensorSpec([len(quality.FLAGS)], tf.bool),
                ),
            )
            return run(x, fov, flags, quality.FLAGS)

        self.serve = tf.function(
            serve,
            input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")],
        )
        self.serve_bytes = tf.function(
            serve_bytes, input_signature=[tf.TensorSpec([None], tf.string, name="encoded")]
        )


def decode_photo(encoded) -> tf.Tensor:
    """uint8 RGB ``[H, W, 3]`` of one encoded JPEG/PNG/GIF/BMP file, as ``serve_bytes`` decodes
    it: a truncated JPEG is decoded as far as its data go (the rest grey, as OpenCV and most
    viewers show it) instead of failing, so the caller gets its ``truncated`` flag; complete
    files decode exactly as ``tf.io.decode_image``."""
    encoded = tf.convert_to_tensor(encoded, tf.string)
    is_jpeg = tf.equal(tf.strings.substr(encoded, 0, 3), b"\xff\xd8\xff")
    return tf.cond(
        is_jpeg,
        lambda: tf.io.decode_jpeg(
            encoded, channels=3, try_recover_truncated=True, acceptable_fraction=0.0
        ),
        lambda: tf.io.decode_image(encoded, channels=3, expand_animations=False),
    )


def _without_layer_traces():
    """A context in which ``tf.saved_model.save`` skips Keras' per-layer call traces.

    The export is read through its serving signatures (:func:`load_exported`), never as a
    Keras model, so the traces of every layer's ``call`` are dead weight; tracing them made the
    export of a small inception network ~8x slower (25 s instead of 3 s on 2 CPU cores). Keras
    2.15 has no public switch for ``tf.saved_model.save``, hence its internal option scope; with
    another Keras the traces are saved as before.
    """
    try:
        from keras.src.saving.legacy.saved_model import utils as keras_saved_model
    except ImportError:  # pragma: no cover - a Keras without the 2.15 layout
        return contextlib.nullcontext()
    return keras_saved_model.keras_option_scope(save_traces=False)


def _demo_sample(image_size: int) -> np.ndarray:
    """Two synthetic fundus photographs (same camera and size) for the post-export check."""
    from drkeras.data import synthetic

    size = max(int(image_size), 32) + 5  # not the model size: the resize path is exercised
    first = synthetic.generate(0, size=size)
    second = synthetic.generate(1, size=size, camera=first.camera)
    return np.stack([first.image, second.image])


def export_model(
    model: tf.keras.Model,
    out_dir,
    *,
    image_size: int,
    preprocess: Mapping,
    output_names: Union[None, Sequence[str], Mapping[str, str]],
    channels: Optional[Mapping[str, ChannelSpec]] = None,
    sample: Optional[np.ndarray] = None,
    tolerance: float = TOLERANCE,
) -> pathlib.Path:
    """Export ``model`` as a SavedModel at ``out_dir``, then reload it and compare outputs.

    Args:
        model: a functional Keras model from preprocessed images ``[B, S, S, 3]`` to named
            outputs (a dict or ``model.output_names``).
        out_dir: the SavedModel folder to write (replaced if it exists; written to a temporary
            folder first, so a failed export leaves no half-written model).
        image_size: ``S``, the model's input side.
        preprocess: keyword arguments of :func:`serving_input` other than ``size``: those of
            ``drkeras.data.preprocess.prepare_image`` (``fov_crop``, ``graham``,
            ``normalization``) and ``resize_size`` / ``quantize`` (the evaluation pipeline's
            resize before a central ``S`` crop, and its uint8 rounding), exactly as the
            experiment's evaluation pipeline.
        output_names: the outputs to serve: a list of model output names (served under the
            same names), a mapping ``{serving_name: model_output_name}``, or ``None`` for all.
        channels: optional channel specs per served output, ``[(name, record lesion types),
            ...]`` (e.g. MTUnet's ``CLASS_SETS["red_yellow_od"]``), saved in the metadata so
            evaluation can compare channels with the record masks; ``lesion_probs`` defaults to
            the record order ``keys.LESIONS``.
        sample: uint8 images ``[B, H, W, 3]`` for the reload check (default: two synthetic
            fundus photographs).
        tolerance: largest accepted absolute difference in the check.

    Returns:
        The SavedModel path.

    Raises:
        ExportMismatch: when the reloaded model differs from ``model`` by more than
            ``tolerance`` on ``sample``.

    Example::

        export_model(model, "runs/x/export/pldmlt", image_size=64,
                     preprocess={"fov_crop": True, "graham": False, "normalization": "unit"},
                     output_names=["grade_probs", "lesion_probs"])
    """
    out = pathlib.Path(out_dir)
    preprocess = dict(preprocess)
    if "size" in preprocess:
        raise ValueError("export_model: pass the input size as image_size, not preprocess['size']")
    accepted = set(inspect.signature(serving_input).parameters) - {"image_uint8", "size"}
    unknown = sorted(set(preprocess) - accepted)
    if unknown:
        raise ValueError(
            f"export_model: preprocess has unknown argument(s) {unknown}; "
            f"drkeras.export.serving_input accepts {sorted(accepted)}"
        )
    if int(preprocess.get("resize_size") or image_size) < int(image_size):
        raise ValueError(
            f"export_model: preprocess['resize_size']={preprocess['resize_size']} is smaller "
            f"than image_size={image_size} (the model sees a central image_size crop of it)"
        )
    # The names a call returns (dict keys, else model.output_names) are what can be served.
    probe = _model_outputs(model, tf.zeros([1, int(image_size), int(image_size), 3]))
    mapping = _select_outputs(probe, output_names)
    clash = sorted(set(mapping) & set(QUALITY_OUTPUTS))
    if clash:
        raise ValueError(
            f"export_model: serving name(s) {clash} are reserved for the input-quality outputs "
            f"{list(QUALITY_OUTPUTS)}; serve the model output under another name with a mapping "
            "{serving_name: model_output_name}"
        )
    outputs_meta = {}
    for serving, name in mapping.items():
        shape = [None] + [int(d) for d in probe[name].shape[1:]]
        spec = (channels or {}).get(serving)
        if spec is None and len(shape) > 2:
            spec = default_channels(serving, shape[-1])
        if spec is not None:
            spec = [[str(c), [str(t) for t in sources]] for c, sources in spec]
            if len(spec) != shape[-1]:
                raise ValueError(
                    f"export_model: channels[{serving!r}] names {len(spec)} channels but the "
                    f"output has {shape[-1]}"
                )
            bad = [t for _, sources in spec for t in sources if t not in keys.LESIONS]
            if bad:
                raise ValueError(
                    f"export_model: channels[{serving!r}] uses {bad}, not record lesion types "
                    f"{keys.LESIONS}"
                )
        outputs_meta[serving] = {"model_output": name, "shape": shape, "channels": spec}
    meta = {
        "format": META_FORMAT,
        "model_name": model.name,
        "image_size": int(image_size),
        "preprocess": preprocess,
        "output_names": list(mapping),
        "outputs": outputs_meta,
        "signatures": {
            "serving_default": "images: uint8 [B, H, W, 3] RGB",
            "serve_bytes": "encoded: string [B] JPEG/PNG",
        },
        "quality": {
            "outputs": {
                FOV_FRACTION: "float32 [B]: share of the photograph in the detected field of view",
                QUALITY: "string [B]: 'ok' or the flags joined by ';'",
            },
            "flags": {
                "serving_default": list(quality.PIXEL_FLAGS),
                "serve_bytes": list(quality.FLAGS),
            },
            "thresholds": quality.thresholds(),
        },
        "dense_outputs_at": "model resolution (image_size x image_size after preprocessing)",
    }
    module = _ServingModule(model, int(image_size), preprocess, mapping, json.dumps(meta))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    with _without_layer_traces():
        tf.saved_model.save(
            module,
            str(tmp),
            signatures={
                "serving_default": module.serve.get_concrete_function(),
                "serve_bytes": module.serve_bytes.get_concrete_function(),
            },
        )
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    if sample is None:
        sample = _demo_sample(int(image_size))
    report = verify_export(model, out, sample, tolerance=tolerance)
    (out / CHECK_FILE).parent.mkdir(exist_ok=True)
    (out / CHECK_FILE).write_text(json.dumps(report, indent=2))
    log.info(
        "exported %s to %s; reload check max |diff| = %.3g (images), %.3g (bytes)",
        model.name,
        out,
        report["max_abs_diff"],
        report["max_abs_diff_bytes"],
    )
    if not report["ok"]:
        raise ExportMismatch(
            f"reloaded SavedModel {out} differs from the Keras model by "
            f"{max(report['max_abs_diff'], report['max_abs_diff_bytes']):.3g} > {tolerance}: "
            f"{report['per_output']}"
        )
    return out


def _encode_png(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError(f"could not PNG-encode an image of shape {image.shape}")
    return buf.tobytes()


def verify_export(model: tf.keras.Model, path, sample, *, tolerance: float = TOLERANCE) -> Dict:
    """Reload the SavedModel at ``path`` and compare it with ``model`` on ``sample``.

    The reference is ``model(serving_batch(sample, **meta preprocess))`` computed here in
    Python; the exported model is called through both signatures (``serve_bytes`` on lossless
    PNG encodings of ``sample``, so the inputs are identical).

    Args:
        model: the Keras model that was exported.
        path: the SavedModel folder.
        sample: uint8 images ``[B, H, W, 3]``.
        tolerance: largest accepted absolute difference.

    Returns:
        ``{"ok", "tolerance", "max_abs_diff", "max_abs_diff_bytes", "per_output": {name:
        [images diff, bytes diff]}, "sample_shape"}``.
    """
    sample = _check_images(sample, "verify_export sample")
    exported = load_exported(path)
    meta = exported.meta
    x = serving_batch(tf.constant(sample), size=meta["image_size"], **meta["preprocess"])
    reference = _model_outputs(model, x)
    from_images = exported.predict(sample)
    encoded = [_encode_png(img) for img in sample]
    from_bytes = exported.predict_bytes(encoded)
    # The quality outputs: what drkeras.data.quality computes eagerly on the same photographs.
    fov_diff, quality_mismatch = 0.0, []
    for i, image in enumerate(sample):
        expected = quality.assess(encoded[i], image)
        pixel_only = [f for f in expected.flags if f in quality.PIXEL_FLAGS]
        for served, text in (
            (from_images, ";".join(pixel_only) or quality.OK),
            (from_bytes, expected.text),
        ):
            fov_diff = max(
                fov_diff, abs(float(served[FOV_FRACTION][i]) - expected.measures["fov_fraction"])
            )
            if served[QUALITY][i] != text:
                quality_mismatch.append([i, str(served[QUALITY][i]), text])
    per_output = {}
    for serving, info in meta["outputs"].items():
        ref = np.asarray(reference[info["model_output"]], np.float32)
        per_output[serving] = [
            float(np.max(np.abs(from_images[serving] - ref))),
            float(np.max(np.abs(from_bytes[serving] - ref))),
        ]
    worst_images = max(v[0] for v in per_output.values())
    worst_bytes = max(v[1] for v in per_output.values())
    quality_ok = fov_diff < tolerance and not quality_mismatch
    return {
        "ok": bool(worst_images < tolerance and worst_bytes < tolerance and quality_ok),
        "tolerance": tolerance,
        "max_abs_diff": worst_images,
        "max_abs_diff_bytes": worst_bytes,
        "per_output": per_output,
        "quality": {"fov_fraction_max_abs_diff": fov_diff, "mismatches": quality_mismatch},
        "sample_shape": list(sample.shape),
    }


def _check_images(images, what: str) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"{what}: expected uint8 RGB images of shape [batch, height, width, 3], got dtype "
            f"{images.dtype} and shape {list(images.shape)}"
        )
    return images


def _numpy_outputs(out: Mapping[str, tf.Tensor]) -> Dict[str, np.ndarray]:
    """Signature outputs as numpy arrays; string outputs (``quality``) as ``str`` arrays."""
    result = {}
    for name, value in out.items():
        array = value.numpy()
        if value.dtype == tf.string:
            array = np.array([v.decode("utf-8") for v in array.ravel()]).reshape(array.shape)
        result[name] = array
    return result


class ExportedModel:
    """A loaded drkeras SavedModel: metadata plus checked calls of its two signatures.

    Attributes:
        path: the SavedModel folder.
        meta: the decoded ``drkeras_meta`` (see :func:`export_model`).
        module: the object returned by ``tf.saved_model.load``.
        signatures: its ``serving_default`` and ``serve_bytes`` concrete functions.

    Example::

        >>> exported = load_exported("runs/pldmlt_smoke/export/pldmlt")   # doctest: +SKIP
        >>> images = np.zeros((1, 300, 400, 3), np.uint8)
        >>> exported.predict(images)["grade_probs"].shape  # doctest: +SKIP
        (1, 5)
    """

    def __init__(self, path):
        self.path = pathlib.Path(path)
        if not (self.path / "saved_model.pb").is_file():
            raise FileNotFoundError(
                f"{self.path} is not a SavedModel folder (no saved_model.pb); pass the folder "
                "written by drkeras.export.export_model"
            )
        self.module = tf.saved_model.load(str(self.path))
        if not hasattr(self.module, "drkeras_meta"):
            raise ValueError(
                f"{self.path} is a SavedModel but not a drkeras export (no drkeras_meta); "
                "export it with drkeras.export.export_model"
            )
        self.meta = json.loads(self.module.drkeras_meta.numpy().decode("utf-8"))
        self.signatures = self.module.signatures

    @property
    def output_names(self) -> list:
        return list(self.meta["output_names"])

    @property
    def quality_outputs(self) -> list:
        """The input-quality outputs of the signatures (empty for exports made before them)."""
        return list(self.meta.get("quality", {}).get("outputs", {}))

    @property
    def image_size(self) -> int:
        if "image_size" not in self.meta:
            raise ValueError(
                f"{self.path} serves {self.meta.get('input', 'no photographs')!r} "
                f"(format {self.meta.get('format')!r}), not photographs: it has no image size; "
                "use the run's image export"
            )
        return int(self.meta["image_size"])

    def predict(self, images) -> Dict[str, np.ndarray]:
        """Run ``serving_default`` on uint8 RGB images ``[B, H, W, 3]``; numpy outputs (the
        ``quality`` strings as ``str``)."""
        images = _check_images(images, f"{self.path}: predict")
        out = self.signatures["serving_default"](images=tf.constant(images))
        return _numpy_outputs(out)

    def predict_bytes(self, encoded: Sequence[bytes]) -> Dict[str, np.ndarray]:
        """Run ``serve_bytes`` on encoded JPEG/PNG images (a list of ``bytes``)."""
        encoded = list(encoded)
        if not encoded or not all(isinstance(e, (bytes, bytearray)) for e in encoded):
            raise ValueError(f"{self.path}: predict_bytes expects a non-empty list of bytes")
        out = self.signatures["serve_bytes"](encoded=tf.constant(encoded, tf.string))
        return _numpy_outputs(out)

    __call__ = predict


def load_exported(path) -> ExportedModel:
    """Load a SavedModel written by :func:`export_model` (metadata decoded, calls checked)."""
    return ExportedModel(path)
