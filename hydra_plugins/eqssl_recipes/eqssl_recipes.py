"""Hydra plugin: makes eqssl's recipes compose in ``fairseq-hydra-train`` from any folder.

Hydra imports every module under the ``hydra_plugins`` namespace package when it starts, and
asks each search-path plugin for its search path before it composes a config. That is the one
moment before composition that eqssl can use: see ``eqssl.hydra_configs``.
"""

import sys

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class EqsslRecipes(SearchPathPlugin):
    """Registers eqssl's configs before a fairseq hydra app composes its recipe."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        # Other hydra apps in the same environment must not pay for importing fairseq and torch.
        if "fairseq" in sys.modules:
            from eqssl.hydra_configs import register

            register()
