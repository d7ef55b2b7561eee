"""Export eqssl checkpoints so that they load without eqssl: ``eqssl-export IN OUT [--format hf]``.

BEST-RQ (eq_bestrq) and CPC (eq_cpc) checkpoints, which fairseq has no model for, are written as
plain PyTorch data by ``eqssl.cli.export_bestrq`` and ``eqssl.cli.export_cpc``; the rest of this
docstring is about wav2vec 2.0.

eqssl's checkpoints name its own components (model ``eq_wav2vec2``, task
``equilibrium_pretraining``, criterion ``equilibrium_wav2vec``, ``common.user_dir``), so loading
them needs eqssl installed. The network is fairseq's ``Wav2Vec2Model`` unchanged, so this module
only rewrites the config:

* a pre-training checkpoint becomes model ``wav2vec2``, task ``audio_pretraining``, criterion
  ``wav2vec``, each with only the fields of fairseq's own config class, and
  ``common.user_dir: None``; the optimizer state and eqssl's logged meters are dropped;
* a fine-tuned checkpoint (fairseq's ``wav2vec_ctc``, whose ``cfg.model.w2v_args`` holds the eqssl
  pre-training config) gets its ``w2v_args`` rewritten the same way and ``user_dir`` None; its
  ``task_state`` (the target Dictionary) is kept.

The weights are copied unchanged. The result loads with plain fairseq
(``checkpoint_utils.load_model_ensemble_and_task([OUT])``, no ``--user-dir``) and with torchaudio's
``import_fairseq_model`` on the model fairseq builds from it.

For Hugging Face transformers, ``eqssl-export CKPT OUT_DIR --format hf`` (``eqssl.cli.export_hf``,
needs the ``hf`` extra) writes a folder that ``Wav2Vec2ForPreTraining.from_pretrained`` (pre-training
checkpoints) or ``Wav2Vec2ForCTC.from_pretrained`` and ``pipeline("automatic-speech-recognition")``
(fine-tuned ones, with their processor) load; it maps the weights itself, so neither fairseq nor
transformers' conversion script is needed on the receiving side. See docs/hf_export.md.

eq_wav2vec2_tiny as named (64 conv channels = 64-dim encoder) has no ``post_extract_proj``, which
torchaudio requires; the default export then still works but emits a PortabilityWarning (``--format
hf`` gives transformers' projection the identity, which is exact).

With torch >= 2.6 a fine-tuned fairseq checkpoint (stock or exported) pickles a
``fairseq.data.Dictionary``, which ``torch.load``'s default ``weights_only=True`` refuses: without
eqssl, call ``torch.serialization.add_safe_globals([fairseq.data.Dictionary])`` before loading.
"""

import dataclasses
import os
import warnings
from typing import Any, Dict, Iterable, List, Optional
from unittest import mock

import torch

from ..checkpoints import load_failure
from .export_bestrq import FORMAT, BestRqExportError, export_bestrq_state, is_bestrq
from .export_cpc import FORMAT as CPC_FORMAT, CpcExportError, export_cpc_state, is_cpc

PRETRAINING = "pretraining"
FINETUNED = "finetuned"

_EQSSL_COMMON = ("user_dir",)


class ExportError(ValueError):
    """An input or output that cannot be exported, with its path in the message."""


class PortabilityWarning(UserWarning):
    """The export loads in fairseq, but a known converter (torchaudio, transformers) cannot take it."""


def _field_names(config_class: type) -> List[str]:
    """The field names of a fairseq config dataclass."""
    return [f.name for f in dataclasses.fields(config_class)]


def _stock_fields() -> Dict[str, List[str]]:
    """Field names of fairseq's own model, task and criterion configs."""
    from fairseq.criterions.wav2vec_criterion import Wav2VecCriterionConfig
    from fairseq.models.wav2vec.wav2vec2 import Wav2Vec2Config
    from fairseq.tasks.audio_pretraining import AudioPretrainingConfig

    return {
        "model": _field_names(Wav2Vec2Config),
        "task": _field_names(AudioPretrainingConfig),
        "criterion": _field_names(Wav2VecCriterionConfig),
    }


STOCK_NAMES = {"model": "wav2vec2", "task": "audio_pretraining", "criterion": "wav2vec"}


def _plain(value: Any) -> Any:
    """An omegaconf container (or anything else) as plain Python dicts and lists."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True, enum_to_str=True)
    return value


def _keep(group: Optional[dict], names: Iterable[str], new_name: str) -> dict:
    """``group`` with only the fields in ``names`` and ``_name`` set to ``new_name``."""
    allowed = set(names)
    kept = {key: value for key, value in (group or {}).items() if key in allowed and key != "_name"}
    return {"_name": new_name, **kept}


def is_pretraining_model(name: Optional[str]) -> bool:
    """Whether a model ``_name`` is pre-training: wav2vec 2.0 (stock or eqssl), eq_bestrq or eq_cpc, any size."""
    return name is not None and (name == "wav2vec2" or str(name).startswith(("eq_wav2vec2", "eq_bestrq", "eq_cpc")))


def stock_pretraining_cfg(cfg: dict) -> dict:
    """A pre-training checkpoint's cfg with model, task and criterion made fairseq's own."""
    cfg = dict(_plain(cfg))
    fields = _stock_fields()
    for group, new_name in STOCK_NAMES.items():
        cfg[group] = _keep(cfg.get(group), fields[group], new_name)
    cfg["common"] = {**(cfg.get("common") or {}), **{key: None for key in _EQSSL_COMMON}}
    return cfg


def checkpoint_kind(state: Any, path: str) -> str:
    """PRETRAINING or FINETUNED, or an ExportError naming ``path`` for anything else."""
    if not isinstance(state, dict) or "model" not in state:
        raise ExportError(f"{path}: not a fairseq checkpoint (no model weights)")
    cfg = state.get("cfg")
    if cfg is None:
        raise ExportError(f"{path}: a fairseq checkpoint without a cfg (argparse era); not an eqssl one")
    model_cfg = cfg.get("model") if hasattr(cfg, "get") else None
    name = model_cfg.get("_name") if hasattr(model_cfg, "get") else None
    if is_pretraining_model(name):
        return PRETRAINING
    if name == "wav2vec_ctc":
        w2v_args = model_cfg.get("w2v_args")
        inner = w2v_args.get("model") if hasattr(w2v_args, "get") else None
        inner_name = inner.get("_name") if hasattr(inner, "get") else None
        if not is_pretraining_model(inner_name):
            raise ExportError(
                f"{path}: a wav2vec_ctc checkpoint whose w2v_args hold a {inner_name!r} model, "
                "not a pre-training model (wav2vec2 / eq_wav2vec2 / eq_bestrq / eq_cpc)"
            )
        return FINETUNED
    raise ExportError(
        f"{path}: holds a {name!r} model, not a pre-training checkpoint "
        "(wav2vec2 / eq_wav2vec2 / eq_bestrq / eq_cpc) or a fine-tuned wav2vec_ctc one"
    )


def load_input(path: str) -> dict:
    """Load a checkpoint on CPU through fairseq (after ``import eqssl``), naming ``path`` on failure."""
    if not os.path.isfile(path):
        raise ExportError(f"input {path}: no such file")
    import eqssl  # noqa: F401  (registers the safe globals fairseq checkpoints need)
    from fairseq.checkpoint_utils import load_checkpoint_to_cpu

    try:
        state = load_checkpoint_to_cpu(path)
    except Exception as error:
        raise ExportError(
            f"input {path}: {load_failure(path, error)}"
        ) from None
    checkpoint_kind(state, f"input {path}")
    return state


def _stock_history(history: Optional[list], kind: str) -> list:
    """optimizer_history with eqssl's criterion name replaced by fairseq's."""
    history = [dict(entry) for entry in (history or [{"num_updates": 0}])]
    for entry in history:
        if kind == PRETRAINING and entry.get("criterion_name") == "EquilibriumWav2vecCriterion":
            entry["criterion_name"] = "Wav2vecCriterion"
        entry.pop("optimizer", None)  # very old layouts kept optimizer state here
    return history


def export_state(state: dict, path: str = "<checkpoint>") -> dict:
    """The stock fairseq checkpoint dict for an eqssl (or stock) one; weights are shared, not copied."""
    kind = checkpoint_kind(state, path)
    cfg = dict(_plain(state["cfg"]))
    if kind == PRETRAINING:
        cfg = stock_pretraining_cfg(cfg)
    else:
        model_cfg = dict(cfg["model"])
        model_cfg["w2v_args"] = stock_pretraining_cfg(model_cfg["w2v_args"])
        cfg["model"] = model_cfg
        cfg["common"] = {**(cfg.get("common") or {}), **{key: None for key in _EQSSL_COMMON}}
    extra = {k: v for k, v in (state.get("extra_state") or {}).items() if k != "metrics"}
    return {
        "args": None,
        "cfg": cfg,
        "model": state["model"],
        "criterion": None,
        "optimizer_history": _stock_history(state.get("optimizer_history"), kind),
        "task_state": state.get("task_state") or {},
        "extra_state": extra,
        "last_optimizer_state": None,
    }


def check_weights_fit(exported: dict, path: str = "<checkpoint>") -> None:
    """Build the stock Wav2Vec2Model on the meta device and check the weights fit it exactly."""
    from fairseq.dataclass.utils import merge_with_parent
    from fairseq.models.wav2vec import wav2vec2
    from fairseq.models.wav2vec.wav2vec2 import Wav2Vec2Config, Wav2Vec2Model
    from omegaconf import OmegaConf

    cfg = exported["cfg"]["model"]
    prefix = ""
    if cfg["_name"] == "wav2vec_ctc":
        cfg, prefix = cfg["w2v_args"]["model"], "w2v_encoder.w2v_model."
    config = merge_with_parent(Wav2Vec2Config(), OmegaConf.create(cfg))
    # BERT-style init copies through the CPU, which meta tensors cannot; no values are needed.
    with torch.device("meta"), mock.patch.object(wav2vec2, "init_bert_params", lambda module: None):
        expected = {k: v.shape for k, v in Wav2Vec2Model(config).state_dict().items()}
    weights = {k[len(prefix):]: v.shape for k, v in exported["model"].items() if k.startswith(prefix)}
    if prefix:  # fine-tuning drops the pre-training-only modules
        expected = {k: v for k, v in expected.items() if k in weights}
    if weights != expected:
        missing = sorted(set(expected) - set(weights))[:5]
        wrong = sorted(k for k in set(expected) & set(weights) if expected[k] != weights[k])[:5]
        raise ExportError(
            f"{path}: the weights do not fit the stock wav2vec2 config built from it "
            f"(missing {missing}, unexpected {sorted(set(weights) - set(expected))[:5]}, shape {wrong})"
        )


def portability_warnings(exported: dict) -> List[str]:
    """Known limits of other loaders for this architecture (empty when there are none).

    fairseq builds no ``post_extract_proj`` when the last convolution's channel count equals
    ``encoder_embed_dim``; torchaudio's ``import_fairseq_model`` (and the transformers conversion)
    assume the projection exists. fairseq itself loads such a checkpoint fine.
    """
    cfg = exported["cfg"]["model"]
    if cfg["_name"] == "wav2vec_ctc":
        cfg = cfg["w2v_args"]["model"]
    from fairseq.models.wav2vec.wav2vec2 import Wav2Vec2Config

    layers = cfg.get("conv_feature_layers", Wav2Vec2Config.conv_feature_layers)
    channels = eval(layers)[-1][0]  # fairseq itself reads this field with eval
    width = cfg.get("encoder_embed_dim", Wav2Vec2Config.encoder_embed_dim)
    if channels == width and not cfg.get("quantize_input"):
        return [
            f"the feature encoder's {channels} channels equal encoder_embed_dim, so the model has no "
            "post_extract_proj: fairseq loads it, but torchaudio's import_fairseq_model and the "
            "transformers conversion script expect that projection and cannot convert it"
        ]
    return []


def export_checkpoint(src: str, dst: str) -> str:
    """Write the export of checkpoint ``src`` to ``dst`` (never overwritten); return its kind
    (PRETRAINING or FINETUNED)."""
    return _export(src, dst)[0]


def _export(src: str, dst: str) -> tuple:
    """export_checkpoint's work: (kind, what was written, in words)."""
    if os.path.lexists(dst):
        raise ExportError(f"{dst}: already exists; not overwriting it")
    state = load_input(src)
    if is_bestrq(state) or is_cpc(state):
        try:
            exported = export_bestrq_state(state, src) if is_bestrq(state) else export_cpc_state(state, src)
        except (BestRqExportError, CpcExportError) as error:
            raise ExportError(str(error)) from None
    else:
        exported = export_state(state, src)
        check_weights_fit(exported, src)
        for message in portability_warnings(exported):
            warnings.warn(f"{src}: {message}", PortabilityWarning, stacklevel=2)
    folder = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(folder):
        raise ExportError(f"{dst}: no such folder {folder}")
    partial = dst + ".partial"
    torch.save(exported, partial)
    os.replace(partial, dst)
    if is_bestrq(state):
        return exported["kind"], f"BEST-RQ {exported['kind']} export, plain PyTorch ({FORMAT})"
    if is_cpc(state):
        return exported["kind"], f"CPC {exported['kind']} export, plain PyTorch ({CPC_FORMAT})"
    kind = checkpoint_kind(exported, dst)
    return kind, f"stock fairseq wav2vec 2.0 {kind} checkpoint"
