"""Environments that cannot run as given: refused with one line that says what to do. Every case here failed on
the code before its fix."""

from __future__ import annotations

import sys

import pytest

from gradus.envs.adapters import INSTALL_HINT, OpenEnvAdapter


def test_an_openenv_environment_without_openenv_installed_says_which_extra_to_install(monkeypatch):
    for module in ("openenv", "openenv.core", "openenv.core.env_server"):
        monkeypatch.setitem(sys.modules, module, None)  # `import openenv` raises ImportError, as where it is absent

    class Game(OpenEnvAdapter):
        name = "game"

    with pytest.raises(ImportError) as caught:
        Game()
    message = str(caught.value)
    assert "\n" not in message and INSTALL_HINT in message and 'pip install -e ".[openenv]"' in message
