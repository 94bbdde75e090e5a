"""Suite-wide setup: no hub access, and a session hub cache holding tiny copies of the real repos.

``hub_cache`` holds ``LanguageBind/Video-LLaVA-7B`` (original layout, SentencePiece tokenizer
without a ``legacy`` key), ``LanguageBind/Video-LLaVA-7B-hf`` (the transformers port),
``LanguageBind/LanguageBind_Video_merge`` / ``LanguageBind_Image`` (the towers) and
``lmsys/vicuna-7b-v1.5`` (the LLM, ``legacy: false``), each in its repo's file layout
(``hub_repos``), so hub ids resolve offline through ``cache_dir`` as they do for users.
"""

from __future__ import annotations

import os

import pytest

# Nothing here can reach a hub; huggingface_hub reads this at import time.
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def hub_cache(tmp_path_factory: pytest.TempPathFactory):
    """The session's hub cache (``hub_repos.HubCache``); tests must not modify it."""
    from hub_repos import build_hub_cache

    return build_hub_cache(tmp_path_factory.mktemp("hub"))
