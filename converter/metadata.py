"""Standard TFLite Model Metadata for an image classifier: write it into a model, read it back.

The layout is the one off-the-shelf runtimes (MediaPipe Tasks' ImageClassifier, the TFLite Task
Library) read: a model buffer named ``TFLITE_METADATA`` holding a `ModelMetadata` flatbuffer (file
identifier ``M001``) whose input tensor carries `ImageProperties` (RGB) and `NormalizationOptions`
(mean and std in pixel units: ``x = (pixel - mean) / std``), whose output tensor names the labels file
as an associated file of type ``TENSOR_AXIS_LABELS``, and the labels file itself zipped (stored,
uncompressed) onto the end of the model so that the `.tflite` is also a zip archive.

Needs only `flatbuffers`, the model schema shipped by LiteRT and the vendored metadata schema; no
TensorFlow, so devices and the server can read it.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as _model_fb

from ._vendor import tflite_metadata_schema as _meta_fb
from .errors import BundleFormatError, ConverterFailedError

#: Name of the model buffer that holds the metadata flatbuffer, as TFLite Support defines it.
METADATA_BUFFER_NAME = "TFLITE_METADATA"
#: The oldest metadata parser that understands every field written here (all are schema 1.0.0).
MIN_PARSER_VERSION = "1.0.0"
#: Name of the labels file zipped onto the model.
LABELS_FILE_NAME = "labels.txt"
_MODEL_IDENTIFIER = b"TFL3"
_METADATA_IDENTIFIER = b"M001"
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed, so the same inputs give the same model bytes


@dataclass(frozen=True)
class ClassifierMetadata:
    """What the metadata of an image classifier says (what `write_metadata` takes and `read_metadata` returns)."""

    name: str
    description: str
    version: str
    author: str
    license: str
    labels: tuple[str, ...]
    #: NormalizationOptions in pixel units, one value per channel: x = (pixel - mean) / std.
    mean: tuple[float, ...]
    std: tuple[float, ...]
    color_space: str = "RGB"
    input_name: str = "image"
    output_name: str = "probability"
    labels_file: str = LABELS_FILE_NAME
    min_parser_version: str = MIN_PARSER_VERSION


def write_metadata(model: bytes, metadata: ClassifierMetadata, *, integer_input: bool = False) -> bytes:
    """`model` with `metadata` added (replacing any earlier TFLITE_METADATA) and the labels zipped on.

    `integer_input` says the model takes uint8 pixels: the input's stats are then 0..255 rather than
    the normalised range (runtimes feed raw pixels to such models and ignore the normalisation).
    """
    buffer = _metadata_buffer(metadata, integer_input)
    packed = _insert_buffer(model, buffer)
    labels = "".join(f"{label}\n" for label in metadata.labels).encode("utf-8")
    out = io.BytesIO()
    out.write(packed)
    with zipfile.ZipFile(out, "a", compression=zipfile.ZIP_STORED) as archive:
        info = zipfile.ZipInfo(metadata.labels_file, date_time=_ZIP_DATE)
        info.compress_type = zipfile.ZIP_STORED
        archive.writestr(info, labels)
    return out.getvalue()


def _metadata_buffer(meta: ClassifierMetadata, integer_input: bool) -> bytes:
    image = _meta_fb.TensorMetadataT()
    image.name = meta.input_name
    image.description = "RGB photo, resized and normalised as the bundle's PreprocessSpec says."
    image.content = _meta_fb.ContentT()
    image.content.contentPropertiesType = _meta_fb.ContentProperties.ImageProperties
    image.content.contentProperties = _meta_fb.ImagePropertiesT()
    image.content.contentProperties.colorSpace = getattr(_meta_fb.ColorSpaceType, meta.color_space)
    normalization = _meta_fb.NormalizationOptionsT()
    normalization.mean = [float(m) for m in meta.mean]
    normalization.std = [float(s) for s in meta.std]
    unit = _meta_fb.ProcessUnitT()
    unit.optionsType = _meta_fb.ProcessUnitOptions.NormalizationOptions
    unit.options = normalization
    image.processUnits = [unit]
    image.stats = _meta_fb.StatsT()
    if integer_input:
        image.stats.min, image.stats.max = [0.0], [255.0]
    else:
        image.stats.min = [(0.0 - m) / s for m, s in zip(meta.mean, meta.std)]
        image.stats.max = [(255.0 - m) / s for m, s in zip(meta.mean, meta.std)]

    scores = _meta_fb.TensorMetadataT()
    scores.name = meta.output_name
    scores.description = "Probability of each label, in the order of the labels file."
    scores.content = _meta_fb.ContentT()
    scores.content.contentPropertiesType = _meta_fb.ContentProperties.FeatureProperties
    scores.content.contentProperties = _meta_fb.FeaturePropertiesT()
    scores.stats = _meta_fb.StatsT()
    scores.stats.min, scores.stats.max = [0.0], [1.0]
    labels_file = _meta_fb.AssociatedFileT()
    labels_file.name = meta.labels_file
    labels_file.description = "Labels of the output classes, one per line."
    labels_file.type = _meta_fb.AssociatedFileType.TENSOR_AXIS_LABELS
    scores.associatedFiles = [labels_file]

    subgraph = _meta_fb.SubGraphMetadataT()
    subgraph.inputTensorMetadata = [image]
    subgraph.outputTensorMetadata = [scores]
    root = _meta_fb.ModelMetadataT()
    root.name = meta.name
    root.description = meta.description
    root.version = meta.version
    root.author = meta.author
    root.license = meta.license
    root.subgraphMetadata = [subgraph]
    root.minParserVersion = meta.min_parser_version
    builder = flatbuffers.Builder(1024)
    builder.Finish(root.Pack(builder), _METADATA_IDENTIFIER)
    return bytes(builder.Output())


def _insert_buffer(model: bytes, metadata: bytes) -> bytes:
    if not _model_fb.Model.ModelBufferHasIdentifier(model, 0):
        raise ConverterFailedError("the converter's output is not a TFLite flatbuffer (no TFL3 identifier)")
    tree = _model_fb.ModelT.InitFromPackedBuf(bytearray(model), 0)
    if any((b.offset or 0) > 1 for b in tree.buffers or []):
        raise ConverterFailedError("models that keep weights outside the flatbuffer (over 2 GB) are not supported")
    kept = [m for m in (tree.metadata or []) if _text(m.name) != METADATA_BUFFER_NAME]
    buffer = _model_fb.BufferT()
    buffer.data = np.frombuffer(metadata, dtype=np.uint8)
    tree.buffers.append(buffer)
    entry = _model_fb.MetadataT()
    entry.name = METADATA_BUFFER_NAME
    entry.buffer = len(tree.buffers) - 1
    tree.metadata = kept + [entry]
    builder = flatbuffers.Builder(len(model) + len(metadata) + 1024)
    builder.Finish(tree.Pack(builder), _MODEL_IDENTIFIER)
    return bytes(builder.Output())


def read_metadata(model: bytes) -> ClassifierMetadata:
    """Read what `write_metadata` wrote, through the flatbuffer tables and `zipfile` (not the writer's code).

    Raises `BundleFormatError` when the model has no image-classifier metadata.
    """
    try:
        root = _model_fb.Model.GetRootAs(model, 0)
        raw = None
        for i in range(root.MetadataLength()):
            entry = root.Metadata(i)
            if _text(entry.Name()) == METADATA_BUFFER_NAME:
                raw = root.Buffers(entry.Buffer()).DataAsNumpy().tobytes()
        if raw is None:
            raise BundleFormatError(f"the model has no {METADATA_BUFFER_NAME} buffer: it carries no metadata")
        if not _meta_fb.ModelMetadata.ModelMetadataBufferHasIdentifier(raw, 0):
            raise BundleFormatError(f"the model's {METADATA_BUFFER_NAME} buffer is not a metadata flatbuffer")
        meta = _meta_fb.ModelMetadata.GetRootAs(raw, 0)
        subgraph = meta.SubgraphMetadata(0)
        image = subgraph.InputTensorMetadata(0)
        scores = subgraph.OutputTensorMetadata(0)
        mean: tuple[float, ...] = ()
        std: tuple[float, ...] = ()
        for i in range(image.ProcessUnitsLength()):
            unit = image.ProcessUnits(i)
            if unit.OptionsType() == _meta_fb.ProcessUnitOptions.NormalizationOptions:
                options = _meta_fb.NormalizationOptions()
                table = unit.Options()
                options.Init(table.Bytes, table.Pos)
                mean = tuple(float(v) for v in options.MeanAsNumpy())
                std = tuple(float(v) for v in options.StdAsNumpy())
        content = image.Content()
        if content is None or content.ContentPropertiesType() != _meta_fb.ContentProperties.ImageProperties:
            raise BundleFormatError("the model's input is not described as an image in its metadata")
        props = _meta_fb.ImageProperties()
        table = content.ContentProperties()
        props.Init(table.Bytes, table.Pos)
        color_space = {v: k for k, v in vars(_meta_fb.ColorSpaceType).items() if not k.startswith("_")}
        labels_file = None
        for i in range(scores.AssociatedFilesLength()):
            associated = scores.AssociatedFiles(i)
            if associated.Type() == _meta_fb.AssociatedFileType.TENSOR_AXIS_LABELS:
                labels_file = _text(associated.Name())
        if labels_file is None:
            raise BundleFormatError("the model's metadata names no TENSOR_AXIS_LABELS file")
        labels = _zipped_labels(model, labels_file)
        return ClassifierMetadata(
            name=_text(meta.Name()),
            description=_text(meta.Description()),
            version=_text(meta.Version()),
            author=_text(meta.Author()),
            license=_text(meta.License()),
            labels=labels,
            mean=mean,
            std=std,
            color_space=color_space.get(props.ColorSpace(), "UNKNOWN"),
            input_name=_text(image.Name()),
            output_name=_text(scores.Name()),
            labels_file=labels_file,
            min_parser_version=_text(meta.MinParserVersion()),
        )
    except BundleFormatError:
        raise
    except (IndexError, AttributeError, TypeError, ValueError) as exc:  # flatbuffers' errors on bad data
        raise BundleFormatError(f"the model's metadata cannot be read: {exc}") from exc


def associated_files(model: bytes) -> tuple[str, ...]:
    """Names of the files zipped onto the model (empty if there are none)."""
    try:
        with zipfile.ZipFile(io.BytesIO(model)) as archive:
            return tuple(archive.namelist())
    except zipfile.BadZipFile:
        return ()


def _zipped_labels(model: bytes, name: str) -> tuple[str, ...]:
    try:
        with zipfile.ZipFile(io.BytesIO(model)) as archive:
            info = archive.getinfo(name)
            if info.compress_type != zipfile.ZIP_STORED:
                raise BundleFormatError(f"{name} is compressed inside the model; runtimes need it stored")
            text = archive.read(info).decode("utf-8")
    except (zipfile.BadZipFile, KeyError) as exc:
        raise BundleFormatError(f"the model's metadata names {name} but it is not zipped onto the model") from exc
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode("utf-8") if isinstance(value, bytes) else value
