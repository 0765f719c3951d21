"""A trained latent model -> a Hugging Face folder, with the masked family's layout and writer.

The folder is ``ddsc.model.export.write_hf_folder``'s (config.json, model.safetensors, vocab.json, labels.json,
train_config.yaml, the modelling code), here with the latent family's modules as the remote code and
``ddsc.latent.hf`` as its entry. Two shipped modules would both be ``config.py`` (``ddsc.model.config`` and
``ddsc.latent.config``), so the latent ones keep a ``latent_`` prefix where their names clash or could
(``REMOTE_CODE_MODULES``); the import rewriting follows the file names given here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ddsc import errors as errors_module
from ddsc.data.labels import LabelVocab
from ddsc.data.vocab import GeneVocab
from ddsc.latent import blocks as blocks_module
from ddsc.latent import config as latent_config_module
from ddsc.latent import flow as flow_module
from ddsc.latent import hf as latent_hf_module
from ddsc.latent import latent_dit as latent_dit_module
from ddsc.latent import nb as nb_module
from ddsc.latent import vae as vae_module
from ddsc.latent.hf import DDSCLatentModel
from ddsc.model.export import REMOTE_CODE_MODULES as MASKED_MODULES
from ddsc.model.export import write_hf_folder

REMOTE_CODE_MODULES = {
    **{name: module for name, module in MASKED_MODULES.items() if name != "hf.py"},  # dit, conditions, ...
    "errors.py": errors_module,
    "latent_config.py": latent_config_module,
    "latent_blocks.py": blocks_module,
    "latent_nb.py": nb_module,
    "latent_vae.py": vae_module,
    "latent_flow.py": flow_module,
    "latent_dit.py": latent_dit_module,
    "hf.py": latent_hf_module,
}
AUTO_MAP = {"AutoConfig": "hf.DDSCLatentConfig", "AutoModel": "hf.DDSCLatentModel"}


def write_latent_folder(
    model: DDSCLatentModel,
    out: str | Path,
    vocab: GeneVocab,
    labels: LabelVocab | None = None,
    train_config: Any = None,
) -> Path:
    """Write the export folder of a latent model (see ``ddsc.model.export`` for the layout)."""
    return write_hf_folder(model, out, vocab, labels, train_config, REMOTE_CODE_MODULES, AUTO_MAP)
