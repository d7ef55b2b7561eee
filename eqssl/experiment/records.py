"""The experiment's records in git: each finished stage's numbers and identity as a small JSON file
under a tracked folder, so that the tables outlive the machine that ran them.

    DIR/<family>-<settings>/<preset>/seed<S>/<stage>.json      e.g. results/bestrq-small/multidomain/seed1/cssl.1.json
    DIR/<family>-<settings>/<preset>/chain_ratio.json          the α of rounds >= 2, once chosen

A stage's file holds its run-folder record (``eqssl_stage.json``: every number the report reads)
under ``record``, beside its identity: the SHA-256 of its weights (the tensors only, not fairseq's
run metadata), its parent's (the run it started from, or the checkpoint it measured), the commit of
the code, the settings' hash and the machine's reference benchmark figure. The report pools records
only when their settings' hashes agree, and says when a chain link's parent is not the weights
the committed parent record holds (a round recreated on another machine).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
from typing import Dict, Iterable, List, Optional, Tuple

from .plan import PACKAGE, ReproduceError, settings_sha256

SCHEMA = 1
IDENTITY = ("schema", "experiment", "preset", "seed", "stage", "settings_sha256", "commit", "reference_seconds",
            "weights_sha256", "parent", "parent_weights_sha256", "record")
"""The fields of every stage record, in the order written."""

STAGE_FIELDS = {
    "pretraining": ("name", "label", "round", "num_updates", "passes", "gap", "valid_accuracy", "chance", "seconds"),
    "phones": ("upstream", "set", "layers", "seconds"),
    "probe": ("upstream", "set", "wer", "cer", "seconds"),
    "finetune": ("pretrained", "set", "wer", "cer", "seconds"),
}
"""Per kind of stage, the fields of its run-folder record that the report reads."""

VOLATILE = ("seconds", "abx_seconds", "sha256", "input_sha256", "twin_sha256", "checkpoint")
"""Record fields that differ between two runs of the same computation (timings, file hashes that
include fairseq's run metadata): left out when a rerun's record is compared with a committed one."""

def experiment_name(settings: dict) -> str:
    """<family>-<settings file's name>: bestrq-small, cpc-small, wav2vec2-tiny."""
    return f"{settings.get('family', 'wav2vec2')}-{os.path.splitext(os.path.basename(settings['path']))[0]}"


def code_commit() -> str:
    """The git commit of the code that runs (``+dirty`` when eqssl/ or recipes/ differ from it), or
    ``unknown`` outside a git checkout."""
    root = os.path.dirname(PACKAGE)
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no", "--",
                                "eqssl", "recipes"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


REFERENCE_BENCHMARK = ["--arch", "eq_bestrq_tiny", "--shards", "3", "--inner-steps", "0", "--max-tokens", "160000",
                       "--updates", "10", "--warmup", "2", "--json"]
"""examples/benchmark_update_cost.py's arguments for the machine's reference figure: seconds per
CSSL update of the tiny BEST-RQ on three shards, one thread (what one of ``--jobs 2`` runs gets)."""


def reference_seconds(jobs: int = 1) -> float:
    """The machine's reference benchmark figure (REFERENCE_BENCHMARK), measured now (about 20 s):
    ``jobs`` copies side by side, one thread each, as the experiment's ``--jobs`` runs share the
    cores; their median."""
    script = os.path.join(os.path.dirname(PACKAGE), "examples", "benchmark_update_cost.py")
    if not os.path.isfile(script):
        raise ReproduceError(f"{script}: not found: the reference benchmark runs from a checkout of the repository "
                             "(pip install -e); or give --reference-seconds")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    copies = [subprocess.Popen([sys.executable, script, *REFERENCE_BENCHMARK], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env)
              for _ in range(max(1, min(jobs, os.cpu_count() or 1)))]
    figures = []
    for copy in copies:
        out, err = copy.communicate()
        if copy.returncode != 0:
            raise ReproduceError(f"the reference benchmark failed: {script} {' '.join(REFERENCE_BENCHMARK)}\n"
                                 + "\n".join(err.splitlines()[-10:]))
        figures.append(float(json.loads(out.strip().splitlines()[-1])[0]["seconds"]))
    return round(statistics.median(figures), 4)


def weights_sha256(path: str) -> str:
    """SHA-256 of a checkpoint's weights alone: every tensor of its ``model`` state, by name, with
    its dtype and shape (fairseq's run metadata, optimizer state and paths left out), so that the
    same weights saved by two runs or machines hash the same."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=False)["model"]
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


_WEIGHTS: Dict[str, str] = {}
"""File SHA-256 -> weights SHA-256, for checkpoints already hashed in this process."""


def weights_of(folder: str, record: dict) -> str:
    """The weights hash of a finished pre-training stage (its folder and run-folder record)."""
    if record["sha256"] not in _WEIGHTS:
        _WEIGHTS[record["sha256"]] = weights_sha256(os.path.join(folder, record["checkpoint"]))
    return _WEIGHTS[record["sha256"]]


def stage_path(root: str, experiment: str, preset: str, seed: int, stage: str) -> str:
    return os.path.join(root, experiment, preset, f"seed{seed}", stage + ".json")


def stage_kind(stage: str) -> str:
    """pretraining, phones, probe or finetune, from a stage's path (``phones/cssl.1/sv``, ``cssl.1``)."""
    head = stage.split("/")[0]
    return head if head in ("phones", "probe", "finetune") else "pretraining"


def stable(value):
    """A record without its VOLATILE fields, at any depth: what two runs of one computation share."""
    if isinstance(value, dict):
        return {k: stable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [stable(v) for v in value]
    return value


def _write(path: str, content: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(content, f, indent=1, ensure_ascii=False, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)  # whole or absent


def keep(root: str, identity: dict, preset: str, seed: int, stage: str, record: dict,
         weights: Optional[str] = None, parent: Optional[str] = None, parent_weights: Optional[str] = None,
         recreated: bool = False) -> str:
    """Write one finished stage's record under ``root`` (``identity``: experiment, settings_sha256,
    commit, reference_seconds). A record already there is never overwritten: if this run's numbers
    or weights differ from it, that is said and the committed one kept. Returns what happened:
    ``written``, ``same`` or ``differs``."""
    path = stage_path(root, identity["experiment"], preset, seed, stage)
    content = {"schema": SCHEMA, "experiment": identity["experiment"], "preset": preset, "seed": seed, "stage": stage,
               "settings_sha256": identity["settings_sha256"], "commit": identity["commit"],
               "reference_seconds": identity["reference_seconds"], "weights_sha256": weights, "parent": parent,
               "parent_weights_sha256": parent_weights, "record": record}
    if not os.path.exists(path):
        _write(path, content)
        return "written"
    with open(path) as f:
        old = json.load(f)
    same_weights = old.get("weights_sha256") == weights and old.get("parent_weights_sha256") == parent_weights
    same = same_weights and stable(old.get("record")) == stable(record)
    if recreated:
        print(f"records: {stage} (seed {seed}) recreated here: its weights "
              + ("match the committed record's" if old.get("weights_sha256") == weights else
                 f"differ from the committed record's ({weights[:12]} against {str(old.get('weights_sha256'))[:12]}; "
                 "expected on another machine: the stages that start from it record this machine's weights as "
                 "their parent)") + f" ({path})", flush=True)
    elif not same:
        print(f"records: {path} exists and differs from this run's {stage} (seed {seed}) "
              f"({'weights' if not same_weights else 'numbers'}); the existing record is kept: remove it to record "
              "this run's", flush=True)
    return "same" if same else "differs"


def keep_choice(root: str, identity: dict, preset: str, choice: dict) -> None:
    """Record the α of rounds >= 2 (chain_ratio.json's content) beside the preset's seeds."""
    path = os.path.join(root, identity["experiment"], preset, "chain_ratio.json")
    if not os.path.exists(path):
        _write(path, {"schema": SCHEMA, "settings_sha256": identity["settings_sha256"], "commit": identity["commit"],
                      "choice": choice})


def read_choice(root: str, experiment: str, preset: str) -> Optional[dict]:
    path = os.path.join(root, experiment, preset, "chain_ratio.json")
    if not os.path.exists(path):
        return None
    content = _load(path)
    _require(path, content, ("schema", "settings_sha256", "choice"))
    _require(path, content["choice"], ("ratio",), "choice.")
    return content


def _load(path: str) -> dict:
    try:
        with open(path) as f:
            content = json.load(f)
    except (OSError, ValueError) as error:
        raise ReproduceError(f"{path}: not a readable record ({error})") from None
    if not isinstance(content, dict):
        raise ReproduceError(f"{path}: not a record (a JSON object)")
    return content


def _require(path: str, content: dict, fields: Iterable[str], prefix: str = "") -> None:
    for name in fields:
        if name not in content:
            raise ReproduceError(f"{path}: missing field '{prefix}{name}'")


def read_stage(path: str) -> dict:
    """One stage record, checked: its schema and every field the report reads, else one line naming
    the file and the field."""
    content = _load(path)
    _require(path, content, IDENTITY)
    if content["schema"] != SCHEMA:
        raise ReproduceError(f"{path}: schema {content['schema']!r}; this eqssl reads schema {SCHEMA}")
    if not isinstance(content["record"], dict):
        raise ReproduceError(f"{path}: field 'record' is not an object")
    _require(path, content["record"], STAGE_FIELDS[stage_kind(content["stage"])], "record.")
    return content


class RecordSet:
    """The records of one experiment under a records folder, read as the report asks for them; it
    remembers every file it read, for the settings-hash check and the chain-link check."""

    def __init__(self, root: str, settings: dict) -> None:
        self.root, self.settings = root, settings
        self.experiment = experiment_name(settings)
        self.read: Dict[str, dict] = {}  # path -> content

    def stage(self, preset: str, seed: int, stage: str) -> Optional[dict]:
        """The run-folder record of one stage (None: not recorded)."""
        path = stage_path(self.root, self.experiment, preset, seed, stage)
        if not os.path.exists(path):
            return None
        if path not in self.read:
            self.read[path] = read_stage(path)
        return self.read[path]["record"]

    def choice(self, preset: str) -> Optional[float]:
        path = os.path.join(self.root, self.experiment, preset, "chain_ratio.json")
        content = read_choice(self.root, self.experiment, preset)
        if content is None:
            return None
        self.read[path] = content
        return float(content["choice"]["ratio"])

    def check_settings(self) -> None:
        """Refuse records whose settings' hashes differ from each other or from the settings given."""
        by_hash: Dict[str, List[str]] = {}
        for path, content in sorted(self.read.items()):
            by_hash.setdefault(content["settings_sha256"], []).append(path)
        if len(by_hash) > 1:
            named = "; ".join(f"{h[:12]}: {paths[0]}" + (f" and {len(paths) - 1} more" if len(paths) > 1 else "")
                              for h, paths in sorted(by_hash.items()))
            raise ReproduceError(f"{self.root}: records made under different settings cannot be pooled ({named})")
        wanted = settings_sha256(self.settings)
        for found, paths in by_hash.items():
            if found != wanted:
                raise ReproduceError(f"{paths[0]}: made under other settings (hash {found[:12]}) than "
                                     f"{self.settings['path']} (hash {wanted[:12]}); its tables would mix them")

    def broken_links(self) -> List[str]:
        """Every stage whose parent's weights hash is not the one its parent's own record holds."""
        by_stage: Dict[Tuple[str, int, str], dict] = {
            (c["preset"], c["seed"], c["stage"]): c for c in self.read.values() if "stage" in c}
        found = []
        for (preset, seed, stage), content in sorted(by_stage.items()):
            parent = content.get("parent")
            if not parent or content.get("parent_weights_sha256") is None:
                continue
            other = by_stage.get((preset, seed, parent))
            if other is not None and other.get("weights_sha256") != content["parent_weights_sha256"]:
                found.append(f"{stage_path(self.root, self.experiment, preset, seed, stage)}: started from or measured "
                             f"{parent} with weights {content['parent_weights_sha256'][:12]}, not the "
                             f"{str(other.get('weights_sha256'))[:12]} of {parent}'s record (recreated elsewhere); "
                             "kept in the tables")
        return found


def describe(root: str, identity: dict) -> str:
    return (f"records of {identity['experiment']} under {root} (settings {identity['settings_sha256'][:12]}, "
            f"commit {identity['commit'][:12]}, reference figure {identity['reference_seconds']} s on "
            f"{platform.node() or 'this machine'})")
