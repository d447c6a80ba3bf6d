"""Weights from elsewhere, offline: a DenseNet121 downloaded by hand, imported into a local,
hash-pinned store under ``$WORKBENCH_HOME/weights/``.

Layout::

    weights/NAME.pt     the converted state dict: plain tensors (``torch.save`` of a dict) in
                        MONAI's DenseNet121 key layout
                        (:func:`workbench.model.nets.create_network`),
                        one input channel
    weights/NAME.json   its record (:class:`WeightsEntry`): the source file and its sha256, the
                        stored file's sha256, the format, the licence, the input the source
                        expects and the normalization that feeds it our display pixels

Formats: ``torchvision`` (DenseNet121 state dict, today's ``norm1`` or the old ``norm.1``
keys), ``timm`` (``densenet121``: torchvision's key names; ``.pth`` / ``.bin`` or
``.safetensors``), ``torchxrayvision`` (``xrv.models.DenseNet``: torchvision's names, one
channel, pixels in [-1024, 1024]; a state dict or one of their whole pickled models) and
``monai-bundle`` (a folder or a zip with ``configs/metadata.json`` and ``models/model.pt``).

Nothing is unpickled that could run code: every file is read by ``torch.load(weights_only=
True)``. A whole pickled TorchXRayVision model is read the same way with an allow-list that
maps each of its module classes to an inert stand-in (:class:`_Inert`), whose instances only
receive the pickled attributes (no constructor, no ``__setstate__``, no import of
torchxrayvision): the tensors are then collected from the stand-ins' ``_parameters`` and
``_buffers``. Any other global in the pickle refuses the file.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import pickle
import re
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

import workbench
from workbench.catalog.cache import file_sha256
from workbench.config import Settings
from workbench.errors import WorkbenchError
from workbench.model.bundle_info import BundleError, read_bundle_info
from workbench.model.contract import ContractError, ModelContract
from workbench.model.data import Normalization
from workbench.model.nets import create_network, monai_key, sum_input_channels

FORMATS: tuple[str, ...] = ("torchvision", "torchxrayvision", "timm", "monai-bundle")
WEIGHTS_PREFIX = "weights:"  # train --init-from weights:NAME
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
MAX_SOURCE_BYTES = 2 * 1024**3  # a DenseNet121 is ~32 MB; a zip member larger than this is refused
MAX_LICENCE_BYTES = 1024**2
STEM = "features.conv0.weight"

XRV_CONVERT = (
    'python -c "import torch, torchxrayvision as xrv; '
    "m = xrv.models.DenseNet(weights='densenet121-res224-all'); "
    "torch.save(m.state_dict(), 'out.pt')\""
)


class WeightsError(WorkbenchError):
    """A user-facing problem with imported weights (unsafe, unreadable, tampered...)."""


@dataclass(frozen=True)
class SourceInput:
    """The input a source network was trained on: ``(x * scale - mean[c]) / std[c]`` for a
    display pixel ``x`` in [0, 1] and channel ``c``."""

    channels: int
    layout: str  # "RGB" or "gray"
    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int | None
    note: str

    def normalization(self) -> Normalization | None:
        """The one-channel map for our grey display pixels (channel statistics averaged when the
        source had several channels, whose first convolution is summed); None for identity."""
        n = Normalization(
            scale=self.scale,
            mean=sum(self.mean) / len(self.mean),
            std=sum(self.std) / len(self.std),
        )
        return None if n == Normalization() else n


# timm: densenet121 default_cfg (IMAGENET_DEFAULT_MEAN / _STD, input_size (3, 224, 224));
# torchvision: its ImageNet weights' transforms (the same statistics).
IMAGENET = SourceInput(
    3, "RGB", 1.0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 224, "ImageNet mean/std on [0, 1]"
)
# TorchXRayVision: xrv.datasets.normalize, (2 * x / maxval - 1) * 1024, one channel, 224 px.
XRV = SourceInput(1, "gray", 2048.0, (1024.0,), (1.0,), 224, "pixels scaled to [-1024, 1024]")
XRV_PICKLED = SourceInput(
    1,
    "gray",
    2048.0,
    (1024.0,),
    (1.0,),
    224,
    "pixels scaled to [-1024, 1024]; a whole pickled model, read through inert stand-ins",
)


@dataclass(frozen=True)
class WeightsEntry:
    """One imported weights file, as its JSON record stores it."""

    name: str
    format: str
    source_file: str
    source_sha256: str
    file: str
    sha256: str
    tensors: int
    spatial_dims: int
    source_input: dict[str, Any]
    stored_input: dict[str, Any]
    normalization: dict[str, float] | None
    licence: str | None
    licence_file: str | None
    imported: str
    code_version: str
    skipped: list[str] = field(default_factory=list)

    @property
    def input_normalization(self) -> Normalization | None:
        """The normalization training and prediction apply for these weights."""
        return Normalization.from_dict(self.normalization)

    def provenance(self) -> dict[str, Any]:
        """What a bundle trained from these weights records about them."""
        return {
            "name": self.name,
            "format": self.format,
            "sha256": self.sha256,
            "source_file": self.source_file,
            "source_sha256": self.source_sha256,
            "normalization": self.normalization,
        }

    def line(self) -> str:
        """One line for ``workbench weights list``."""
        n = self.input_normalization
        norm = f"(x*{n.scale:g}-{n.mean:g})/{n.std:g}" if n else "display [0,1]"
        return (
            f"{self.name:24s} {self.format:15s} {self.tensors:4d} tensors  "
            f"sha256 {self.sha256[:16]}  input {norm}  "
            f"licence {'recorded' if self.licence else 'none':8s}  imported {self.imported}  "
            f"from {self.source_file}"
        )


def weights_dir(settings: Settings) -> Path:
    return settings.home / "weights"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class _Unsafe(Exception):
    """The pickle names a global that the weights-only loader does not allow."""


def _refused_global(err: BaseException) -> str:
    m = re.search(r"GLOBAL ([\w.]+)", str(err))
    if m:
        return f"it needs {m.group(1)}"
    m = re.search(r"WeightsUnpickler error:\s*(.+)", str(err))
    return m.group(1).strip() if m else _one_line(err)


def _torch_load(data: bytes, what: str) -> Any:
    """``torch.load(weights_only=True)`` on the CPU; :class:`_Unsafe` when the pickle names
    something it does not allow, WeightsError when it is no PyTorch file at all.

    ``data`` are the bytes that were hashed; they are loaded from a private copy on disk
    (PyTorch's oldest files, e.g. torchvision's 2017 ImageNet weights, do not load from a
    BytesIO), so what is loaded is what was hashed."""
    kinds = (data[:2] == b"PK", data[:1] == b"\x80", data[257:262] == b"ustar")
    if not any(kinds):  # neither torch's zip, a (legacy) pickle nor the oldest tar format
        raise WeightsError(f"{what}: not a PyTorch weights file")
    try:
        with tempfile.TemporaryDirectory(prefix="workbench-weights-") as tmp:
            copy = Path(tmp) / "weights.pt"
            copy.write_bytes(data)
            return torch.load(copy, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise _Unsafe(_refused_global(err)) from err
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile, KeyError) as err:
        raise WeightsError(f"{what}: not a PyTorch weights file ({_one_line(err)})") from err


def _state_of(obj: Any, what: str) -> dict[str, torch.Tensor]:
    """The state dict in ``obj``: the dict itself, or the one a training checkpoint keeps
    under ``state_dict`` / ``model`` / ``network``."""
    if isinstance(obj, Mapping):
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return dict(obj)
        for key in ("state_dict", "model", "network", "net", "model_state_dict"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner:
                return _state_of(inner, what)
    raise WeightsError(f"{what}: holds no state dict of tensors (found a {type(obj).__name__})")


# --- safetensors (timm's files on the Hugging Face hub), read without the package -----------

_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _read_safetensors(data: bytes, what: str) -> dict[str, torch.Tensor]:
    """A ``.safetensors`` file: an 8-byte little-endian header length, a JSON header (name ->
    dtype, shape, byte offsets), then the raw little-endian tensor bytes. Data only."""
    try:
        n = int.from_bytes(data[:8], "little")
        if len(data) < 8 or n > min(len(data) - 8, 100 * 1024**2):
            raise ValueError("header length out of range")
        header = json.loads(data[8 : 8 + n])
        body = memoryview(data)[8 + n :]
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = _ST_DTYPES[info["dtype"]]
            shape = [int(s) for s in info["shape"]]
            begin, end = (int(o) for o in info["data_offsets"])
            numel = 1
            for s in shape:
                numel *= s
            item = torch.empty((), dtype=dtype).element_size()
            if not 0 <= begin <= end <= len(body) or end - begin != numel * item:
                raise ValueError(f"{name}: byte range does not fit its shape")
            flat = torch.frombuffer(bytearray(body[begin:end]), dtype=dtype) if numel else None
            out[name] = flat.reshape(shape) if flat is not None else torch.empty(shape, dtype=dtype)
        return out
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise WeightsError(f"{what}: not a readable safetensors file ({_one_line(err)})") from err


# --- whole pickled TorchXRayVision models, through inert stand-ins ---------------------------


class _Inert:
    """A pickled object's attributes, restored without running any of its class's code: the
    weights-only unpickler makes it with ``object.__new__`` and fills its ``__dict__``."""


def _inert(path: str) -> tuple[type, str]:
    cls = type(path.rsplit(".", 1)[1], (_Inert,), {"__module__": __name__, "__doc__": path})
    return cls, path


def _no_backend(*args: Any) -> None:
    """Stands in for torch < 1.0's ``_get_thnn_function_backend`` (an attribute, not code)."""
    return None


# The classes a published TorchXRayVision DenseNet pickle names (xrv.models and torch.nn), and
# DataParallel around it. Nothing else resolves.
_XRV_PICKLE_CLASSES = (
    "torchxrayvision.models.DenseNet",
    "torchxrayvision.models._DenseBlock",
    "torchxrayvision.models._DenseLayer",
    "torchxrayvision.models._Transition",
    "torch.nn.modules.container.Sequential",
    "torch.nn.modules.conv.Conv2d",
    "torch.nn.modules.batchnorm.BatchNorm2d",
    "torch.nn.modules.activation.ReLU",
    "torch.nn.modules.pooling.MaxPool2d",
    "torch.nn.modules.pooling.AvgPool2d",
    "torch.nn.modules.linear.Linear",
    "torch.nn.modules.upsampling.Upsample",
    "torch.nn.modules.dropout.Dropout",
    "torch.nn.parallel.data_parallel.DataParallel",
)
_INERT_GLOBALS: list[Any] = [_inert(p) for p in _XRV_PICKLE_CLASSES] + [
    (_no_backend, "torch.nn.backends.thnn._get_thnn_function_backend"),
]


def _load_inert(data: bytes, what: str) -> Any:
    """A whole pickled model in PyTorch's zip format, its module classes as stand-ins. One in
    the legacy format (torch < 1.6) records each module class with its source code, which the
    weights-only loader cannot take: refused, with the command that converts it."""
    try:
        with torch.serialization.safe_globals(_INERT_GLOBALS):
            return _torch_load(data, what)
    except _Unsafe as err:
        why = (
            "a whole model in PyTorch's legacy (pre-1.6) format, unreadable without running code"
            if not zipfile.is_zipfile(io.BytesIO(data))
            else f"a pickle that could run code ({err})"
        )
        raise WeightsError(
            f"{what}: refused, {why}; convert it where torchxrayvision is installed: "
            f"{XRV_CONVERT}, then import out.pt"
        ) from err


def _module_state(obj: Any, what: str) -> dict[str, torch.Tensor]:
    """The state dict of a module tree of stand-ins: parameters and persistent buffers by
    dotted name, as ``nn.Module.state_dict`` would give them."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()

    def walk(node: Any, prefix: str) -> None:
        if not isinstance(node, _Inert) or id(node) in seen:
            raise WeightsError(f"{what}: {prefix or 'the model'} is not a module tree")
        seen.add(id(node))
        d = vars(node)
        transient = d.get("_non_persistent_buffers_set") or set()
        for group in ("_parameters", "_buffers"):
            for name, value in dict(d.get(group) or {}).items():
                if value is None or (group == "_buffers" and name in transient):
                    continue
                if not isinstance(value, torch.Tensor):
                    raise WeightsError(f"{what}: {prefix}{name} is not a tensor")
                out[prefix + name] = value.detach()
        for name, child in dict(d.get("_modules") or {}).items():
            if child is not None:
                walk(child, f"{prefix}{name}.")

    walk(obj, "")
    return out


# --- readers per format ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    """What a reader found: the tensors, the input they expect, the source's hash."""

    state: dict[str, torch.Tensor]
    expects: SourceInput
    sha256: str
    file_name: str


def _read_file(path: Path, what: str) -> bytes:
    if not path.is_file():
        raise WeightsError(f"{what}: no such file")
    if path.stat().st_size > MAX_SOURCE_BYTES:
        raise WeightsError(f"{what}: larger than {MAX_SOURCE_BYTES >> 30} GiB; not a DenseNet121")
    return path.read_bytes()


def _unsafe(what: str, err: _Unsafe) -> WeightsError:
    return WeightsError(
        f"{what}: refused, not a plain state dict ({err}); load it where its code is trusted "
        "and save model.state_dict() (weights are never unpickled with code here)"
    )


def _read_plain(path: Path) -> _Source:
    """torchvision and timm: a state dict (or a checkpoint holding one); safetensors too."""
    what = path.name
    data = _read_file(path, what)
    if path.suffix == ".safetensors":
        state = _read_safetensors(data, what)
    else:
        try:
            state = _state_of(_torch_load(data, what), what)
        except _Unsafe as err:
            raise _unsafe(what, err) from err
    return _Source(state, IMAGENET, _sha256(data), path.name)


def _read_xrv(path: Path) -> _Source:
    """TorchXRayVision: a state dict, or one of their whole pickled models (inert stand-ins)."""
    what = path.name
    data = _read_file(path, what)
    try:
        state = _state_of(_torch_load(data, what), what)
        expects = XRV
    except _Unsafe:
        state = _module_state(_load_inert(data, what), what)
        expects = XRV_PICKLED
    return _Source(state, expects, _sha256(data), path.name)


def _bundle_parts(path: Path) -> tuple[bytes, bytes, str]:
    """(metadata.json, models/model.pt, sha256 of the source) of a bundle folder or zip."""
    what = path.name
    if path.is_dir():
        meta, model = path / "configs" / "metadata.json", path / "models" / "model.pt"
        if not (meta.is_file() and model.is_file()):
            raise WeightsError(
                f"{what}: a MONAI bundle needs configs/metadata.json and models/model.pt"
            )
        weights = _read_file(model, f"{what}/models/model.pt")
        return _read_file(meta, f"{what}/configs/metadata.json"), weights, _sha256(weights)
    if not zipfile.is_zipfile(path):
        raise WeightsError(f"{what}: neither a MONAI bundle folder nor a zip")
    with zipfile.ZipFile(path) as zf:
        metas = [
            n
            for n in zf.namelist()
            if n == "configs/metadata.json" or n.endswith("/configs/metadata.json")
        ]
        if not metas:
            raise WeightsError(f"{what}: no configs/metadata.json in the zip")
        root = min(metas, key=len).removesuffix("configs/metadata.json")
        try:
            members = [
                zf.getinfo(root + "configs/metadata.json"),
                zf.getinfo(root + "models/model.pt"),
            ]
        except KeyError as err:
            raise WeightsError(f"{what}: no {root}models/model.pt beside its metadata") from err
        if any(m.file_size > MAX_SOURCE_BYTES for m in members):
            raise WeightsError(f"{what}: a member larger than {MAX_SOURCE_BYTES >> 30} GiB")
        meta_bytes, weights = (zf.read(m) for m in members)
    return meta_bytes, weights, file_sha256(path)


def _read_bundle(path: Path) -> _Source:
    """A MONAI model-zoo bundle (a workbench bundle too): its metadata says the channels and
    value range; a workbench bundle's normalization is taken over as it is."""
    what = path.name
    meta_bytes, weights, digest = _bundle_parts(path)
    try:
        meta = json.loads(meta_bytes)
        image = meta.get("network_data_format", {}).get("inputs", {}).get("image", {})
        channels = int(image.get("num_channels", 1))
        shape = image.get("spatial_shape") or [None]
        size = int(shape[0]) if isinstance(shape[0], int) else None
        value_range = image.get("value_range")
        # a bundle of ours carries a model contract; another MONAI bundle none
        ours = meta.get("workbench")
        own = Normalization.from_dict(
            ModelContract.from_dict(ours).normalization if ours is not None else None
        )
    except (ValueError, TypeError, AttributeError, KeyError, ContractError) as err:
        raise WeightsError(
            f"{what}: configs/metadata.json is unreadable ({_one_line(err)})"
        ) from err
    try:
        state = _state_of(_torch_load(weights, what), what)
    except _Unsafe as err:
        raise _unsafe(f"{what}/models/model.pt", err) from err
    layout = "gray" if channels == 1 else "RGB" if channels == 3 else f"{channels} channels"
    note = (
        f"MONAI bundle {meta.get('name', what)} {meta.get('version', '')}".strip()
        + f"; value range {value_range}; its own preprocessing (configs/inference) not translated"
    )
    n = own or Normalization()
    expects = SourceInput(
        channels, layout, n.scale, (n.mean,) * channels, (n.std,) * channels, size, note
    )
    return _Source(state, expects, digest, path.name)


# --- conversion ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _template(spatial_dims: int, n_out: int) -> dict[str, torch.Size]:
    """Key -> shape of MONAI's DenseNet121 with one input channel (built once per shape)."""
    net = create_network(spatial_dims, n_out, in_channels=1)
    return {k: v.shape for k, v in net.state_dict().items()}


def convert_state(
    state: Mapping[str, torch.Tensor], what: str
) -> tuple[dict[str, torch.Tensor], list[str], int, int]:
    """A DenseNet121 state dict in MONAI's layout with one input channel.

    Keys lose any prefix before ``features.`` (``module.``, ``model.``...), torchvision's
    spellings are mapped (:func:`workbench.model.nets.monai_key`), an RGB (or any multi-channel)
    first convolution is summed over its input channels. Every backbone tensor of MONAI's
    DenseNet121 must be there with its shape (WeightsError otherwise). Returns (state,
    skipped source keys, spatial dims, the source's input channels)."""
    stems = [k for k in state if k == STEM or k.endswith("." + STEM)]
    if not stems:
        raise WeightsError(
            f"{what}: no DenseNet first convolution ({STEM}) among its {len(state)} tensors; "
            "is it a DenseNet121 in this format's layout?"
        )
    prefix = min(stems, key=len).removesuffix(STEM)
    stem = state[prefix + STEM]
    if stem.dim() not in (4, 5):
        raise WeightsError(f"{what}: {STEM} has {stem.dim()} dimensions, not a 2D or 3D conv")
    spatial_dims, channels = stem.dim() - 2, int(stem.shape[1])
    head = next(
        (
            v
            for k, v in state.items()
            if monai_key(k.removeprefix(prefix)) == "class_layers.out.weight"
        ),
        None,
    )
    n_out = int(head.shape[0]) if head is not None and head.dim() == 2 else 2
    template = _template(spatial_dims, n_out)
    out: dict[str, torch.Tensor] = {}
    skipped, wrong = [], []
    for key, value in state.items():
        if not key.startswith(prefix) or not isinstance(value, torch.Tensor):
            skipped.append(key)
            continue
        name = monai_key(key.removeprefix(prefix))
        if name == STEM and channels != 1:
            value = sum_input_channels(value)
        if name not in template:
            skipped.append(key)
        elif tuple(value.shape) != tuple(template[name]):
            wrong.append(f"{key} {tuple(value.shape)}")
        else:
            out[name] = value.detach().clone().contiguous()
    backbone = [
        k for k in template if k.startswith("features.") and not k.endswith("num_batches_tracked")
    ]
    missing = [k for k in backbone if k not in out]
    if missing or wrong:
        detail = []
        if missing:
            detail.append(
                f"{len(missing)} of its {len(backbone)} tensors missing (e.g. {missing[0]})"
            )
        if wrong:
            detail.append(f"{len(wrong)} of another shape (e.g. {wrong[0]})")
        raise WeightsError(f"{what}: not a DenseNet121: {'; '.join(detail)}")
    return out, skipped, spatial_dims, channels


def _licence(licence: str | None, licence_file: Path | None) -> str | None:
    if licence_file is not None:
        if not licence_file.is_file():
            raise WeightsError(f"{licence_file}: no such licence file")
        if licence_file.stat().st_size > MAX_LICENCE_BYTES:
            raise WeightsError(f"{licence_file}: a licence file over 1 MiB")
        return licence_file.read_text(errors="replace")
    return licence


def _default_name(path: Path) -> str:
    stem = path.name.split(".")[0] if path.is_file() else path.name
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-._")[:100]
    return name or "weights"


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def import_weights(
    settings: Settings,
    source: Path,
    fmt: str,
    name: str | None = None,
    licence: str | None = None,
    licence_file: Path | None = None,
) -> WeightsEntry:
    """Convert ``source`` (downloaded elsewhere) into the store as ``name`` and record it."""
    if fmt not in FORMATS:
        raise WeightsError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    source = Path(source)
    name = name or _default_name(source)
    if not NAME_PATTERN.fullmatch(name):
        raise WeightsError(f"weights name {name!r}: use letters, digits, '.', '_' and '-'")
    store = weights_dir(settings)
    if (store / f"{name}.json").exists():
        raise WeightsError(f"weights {name!r} are already in the store; choose another --name")
    licence_text = _licence(licence, licence_file)
    if not source.exists():
        raise WeightsError(f"{source}: no such file or folder")
    if fmt == "monai-bundle":
        src = _read_bundle(source)
    elif source.is_dir():
        raise WeightsError(f"{source}: a folder; --format {fmt} reads one weights file")
    elif fmt == "torchxrayvision":
        src = _read_xrv(source)
    else:
        src = _read_plain(source)
    state, skipped, spatial_dims, channels = convert_state(src.state, source.name)
    expects = src.expects
    if expects.channels != channels:  # the file says otherwise than the format's convention
        expects = SourceInput(
            channels,
            "gray" if channels == 1 else "RGB" if channels == 3 else f"{channels} channels",
            expects.scale,
            (sum(expects.mean) / len(expects.mean),) * channels,
            (sum(expects.std) / len(expects.std),) * channels,
            expects.image_size,
            expects.note,
        )
    normalization = expects.normalization()
    buf = io.BytesIO()
    torch.save(state, buf)
    stored = buf.getvalue()
    first_conv = (
        "as in the source (one input channel)"
        if channels == 1
        else f"summed over the source's {channels} input channels (timm's adapt_input_conv); "
        "the normalization averages their statistics"
    )
    entry = WeightsEntry(
        name=name,
        format=fmt,
        source_file=src.file_name,
        source_sha256=src.sha256,
        file=f"{name}.pt",
        sha256=_sha256(stored),
        tensors=len(state),
        spatial_dims=spatial_dims,
        source_input={**asdict(expects), "mean": list(expects.mean), "std": list(expects.std)},
        stored_input={"channels": 1, "layout": "gray", "first_conv": first_conv},
        normalization=normalization.to_dict() if normalization else None,
        licence=licence_text,
        licence_file=licence_file.name if licence_file is not None else None,
        imported=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        code_version=workbench.__version__,
        skipped=skipped,
    )
    store.mkdir(parents=True, exist_ok=True)
    _write_atomic(store / entry.file, stored)
    _write_atomic(store / f"{name}.json", json.dumps(asdict(entry), indent=2).encode())
    return entry


def read_entry(settings: Settings, name: str) -> WeightsEntry:
    """The record of weights ``name`` (WeightsError when there is none)."""
    if not NAME_PATTERN.fullmatch(name):
        raise WeightsError(f"weights name {name!r}: use letters, digits, '.', '_' and '-'")
    path = weights_dir(settings) / f"{name}.json"
    if not path.is_file():
        known = ", ".join(e.name for e in list_weights(settings)) or "none yet"
        raise WeightsError(f"no weights {name!r} in the store (known: {known}); import them first")
    try:
        d = json.loads(path.read_text())
        return WeightsEntry(**{f.name: d[f.name] for f in fields(WeightsEntry) if f.name in d})
    except (ValueError, TypeError) as err:
        raise WeightsError(f"weights {name}: its record is unreadable ({_one_line(err)})") from err


def list_weights(settings: Settings) -> list[WeightsEntry]:
    """Every entry of the store, by name."""
    store = weights_dir(settings)
    if not store.is_dir():
        return []
    return [read_entry(settings, p.stem) for p in sorted(store.glob("*.json"))]


def load_weights(
    settings: Settings, name: str, head: bool = True
) -> tuple[dict[str, torch.Tensor], WeightsEntry]:
    """The stored tensors of ``name`` after checking them against their recorded sha256 (a
    changed file is refused); without ``head`` the source's classifier is left out (its
    classes are not ours)."""
    entry = read_entry(settings, name)
    path = weights_dir(settings) / entry.file
    if not path.is_file():
        raise WeightsError(f"weights {name}: {path} is missing; import the source again")
    data = path.read_bytes()
    digest = _sha256(data)
    if digest != entry.sha256:
        raise WeightsError(
            f"weights {name}: {entry.file} does not match its recorded sha256 "
            f"(recorded {entry.sha256[:16]}, file {digest[:16]}): changed since import, refused"
        )
    try:
        state = _state_of(_torch_load(data, entry.file), entry.file)
    except _Unsafe as err:
        raise _unsafe(entry.file, err) from err
    if not head:
        state = {k: v for k, v in state.items() if not k.startswith("class_layers.")}
    return state, entry


def input_normalization(settings: Settings, init_from: str | None) -> Normalization | None:
    """The normalization a model started from ``init_from`` is trained and used with: the
    imported weights' (``weights:NAME``), an earlier bundle's, none for a weights file."""
    if not init_from:
        return None
    if init_from.startswith(WEIGHTS_PREFIX):
        return read_entry(settings, init_from.removeprefix(WEIGHTS_PREFIX)).input_normalization
    if Path(init_from).is_file():
        return None
    try:
        contract = read_bundle_info(settings.models_dir, init_from).contract
        return Normalization.from_dict(contract.normalization)
    except (BundleError, OSError, ValueError, TypeError, KeyError):
        return None  # prepare_network says what is wrong with it
