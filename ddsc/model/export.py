"""A DiT -> a Hugging Face folder that loads with or without ``ddsc`` installed.

(From a training checkpoint: ``ddsc.train.export``.)

Folder layout (``write_hf_folder``)::

    config.json          DDSCConfig: architecture, max_genes, binning, diffusion, auto_map
    model.safetensors    the DiT weights (no pickle)
    vocab.json           gene vocabulary (token id <-> Ensembl id <-> symbol)
    labels.json          condition labels (id 0 = null); {} for an unconditional model
    train_config.yaml    the exact resolved training config, when known
    config.py dit.py conditions.py chemistry.py tokens.py hf.py   the modelling code, for trust_remote_code

The modelling code is ddsc's own source, copied verbatim except that ``from ddsc.<pkg>.<module> import`` becomes
``from .<module> import``: transformers copies a remote-code module together with its relative imports, so
these files form a closed package of their own. The folder is written under a temporary name and renamed
when complete, so an interrupted export never leaves a folder that looks finished.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from ddsc.config import to_dict
from ddsc.data import chemistry as chemistry_module
from ddsc.data import tokens as tokens_module
from ddsc.data.labels import LabelVocab
from ddsc.data.schema import LABELS_FILE, VOCAB_FILE
from ddsc.data.vocab import GeneVocab
from ddsc.model import conditions as conditions_module
from ddsc.model import config as model_config_module
from ddsc.model import dit as dit_module
from ddsc.model import hf as hf_module
from ddsc.model.hf import DDSCConfig, DDSCModel

# Shipped modules, by file name in the export; relative imports between them must stay inside this set.
REMOTE_CODE_MODULES = {
    "config.py": model_config_module,
    "dit.py": dit_module,
    "conditions.py": conditions_module,
    "chemistry.py": chemistry_module,
    "tokens.py": tokens_module,
    "hf.py": hf_module,
}
AUTO_MAP = {"AutoConfig": "hf.DDSCConfig", "AutoModel": "hf.DDSCModel"}
TRAIN_CONFIG_FILE = "train_config.yaml"
WEIGHTS_FILE = "model.safetensors"
REQUIRED_FILES = ("config.json", WEIGHTS_FILE, VOCAB_FILE, LABELS_FILE)

_DDSC_IMPORT = re.compile(r"^(\s*)from\s+(ddsc(?:\.\w+)*\.(\w+))\s+import\b", re.MULTILINE)
_ANY_DDSC_IMPORT = re.compile(r"^\s*(?:from|import)\s+ddsc\b.*$", re.MULTILINE)
_RELATIVE_IMPORT = re.compile(r"^\s*from\s+\.(\w+)\s+import\b", re.MULTILINE)


def relative_imports(source: str, names: Mapping[str, str] | None = None) -> str:
    """``from ddsc.a.b import X`` -> ``from .b import X``; any other import of ``ddsc`` is an error.

    ``names`` maps a module's dotted name to its file stem in the export where that is not its last component:
    two families' modules may share a name (``ddsc.model.config`` and ``ddsc.latent.config``), and one folder
    can hold only one ``config.py``.
    """
    names = names or {}

    def rewrite(match: re.Match) -> str:
        return f"{match.group(1)}from .{names.get(match.group(2), match.group(3))} import"

    rewritten = _DDSC_IMPORT.sub(rewrite, source)
    leftover = _ANY_DDSC_IMPORT.search(rewritten)
    if leftover:
        raise ValueError(f"cannot ship as remote code: {leftover.group(0).strip()!r} (use 'from ddsc.x.y import')")
    return rewritten


def remote_code_sources(
    modules: Mapping[str, ModuleType] = REMOTE_CODE_MODULES, entry: str = "hf.py"
) -> dict[str, str]:
    """``{file name: rewritten source}`` for the export of ``modules`` (``{file name: module}``).

    Checks that the files import only each other, and that the entry module imports every other one directly:
    loading from a local folder, transformers copies only the entry module's own relative imports.
    """
    names = {module.__name__: Path(name).stem for name, module in modules.items()}
    sources = {name: relative_imports(Path(m.__file__).read_text(), names) for name, m in modules.items()}
    imports = {name: set(_RELATIVE_IMPORT.findall(source)) for name, source in sources.items()}
    for name, imported in imports.items():
        unknown = sorted(f"{i}.py" for i in imported if f"{i}.py" not in sources)
        if unknown:
            raise ValueError(f"remote code {name} imports {unknown}, which are not shipped")
    not_direct = sorted(set(sources) - {entry} - {f"{i}.py" for i in imports[entry]})
    if not_direct:
        raise ValueError(f"remote code {entry} must import {not_direct} directly (transformers copies only those)")
    return sources


def write_hf_folder(
    model: DDSCModel,
    out: str | Path,
    vocab: GeneVocab,
    labels: LabelVocab | None = None,
    train_config: Any = None,
    remote_code: Mapping[str, ModuleType] = REMOTE_CODE_MODULES,
    auto_map: Mapping[str, str] = AUTO_MAP,
) -> Path:
    """Write the export folder (see the module docstring); ``train_config`` is a RunConfig or a plain dict.

    Another family (``ddsc.latent.export``) passes its own ``remote_code`` modules and ``auto_map``: any
    ``PreTrainedModel`` whose config has ``gene_vocab_size`` and ``conditions`` (dicts) gets the same layout.
    """
    out = Path(out)
    if len(vocab) > model.config.gene_vocab_size:
        raise ValueError(
            f"gene vocabulary has token ids up to {len(vocab) - 1} but the model embeds only "
            f"{model.config.gene_vocab_size} genes (model.gene_vocab_size)"
        )
    check_labels(model.config, labels)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.config.auto_map = dict(auto_map)
    model.save_pretrained(partial, safe_serialization=True)
    vocab.to_json(partial / VOCAB_FILE)
    (labels or LabelVocab({})).to_json(partial / LABELS_FILE)
    if train_config is not None:
        (partial / TRAIN_CONFIG_FILE).write_text(yaml.safe_dump(to_dict(train_config), sort_keys=False))
    for name, source in remote_code_sources(remote_code).items():
        (partial / name).write_text(source)
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return out


def check_labels(config: DDSCConfig, labels: LabelVocab | None) -> None:
    """Every label condition of the model needs its label column, with exactly the number of labels it embeds."""
    for condition in (c for c in config.conditions if c["kind"] == "label"):
        if labels is None:
            raise ValueError(f"the model is conditioned on {condition['name']!r}: a label vocabulary is required")
        n = labels.num_labels(condition["name"])
        if n != condition["num_labels"]:
            raise ValueError(
                f"labels[{condition['name']!r}] has {n} labels but the model embeds {condition['num_labels']}"
            )


def hf_config_from_run(run) -> DDSCConfig:
    """DDSCConfig of a resolved ``RunConfig`` (condition label counts already filled in)."""
    return DDSCConfig.from_model_config(
        run.model,
        max_genes=run.data.max_length,
        binning=to_dict(run.data.binning),
        diffusion=to_dict(run.diffusion),
    )
