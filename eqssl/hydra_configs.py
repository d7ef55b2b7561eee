"""What eqssl's recipes need from hydra before ``fairseq-hydra-train`` composes them.

fairseq imports a plugin (``common.user_dir``) only after hydra has composed the recipe, so on
its own a recipe could neither find eqssl from another working folder nor name eqssl's config
classes. eqssl's hydra plugin (``hydra_plugins/eqssl_recipes``) calls :func:`register` first:

* importing eqssl registers its task, criterion and model dataclasses in hydra's ConfigStore
  (fairseq's ``register_*`` decorators do that), so a recipe's defaults list can start from
  them (``- task: equilibrium_pretraining``) and every field is overridable as ``task.X=…``;
* the resolver ``${eqssl:user_dir}`` gives the installed package's folder, for
  ``common.user_dir``;
* fairseq's schema of the recipe (``FairseqConfig``) is found for a recipe named with its group
  too (``--config-dir recipes --config-name pretrain/cssl_tiny``), and hydra's notice that it is
  matched by name, which only fairseq can act on, is not printed.
"""

import warnings

from omegaconf import OmegaConf

RESOLVER = "eqssl"


def _resolve(name: str) -> str:
    """``${eqssl:user_dir}``: the installed eqssl package's absolute folder."""
    from eqssl.cli.user_dir import user_dir

    if name != "user_dir":
        raise ValueError(f"${{{RESOLVER}:{name}}}: unknown; eqssl resolves only ${{{RESOLVER}:user_dir}}")
    return user_dir()


def store_schema_in_its_group() -> None:
    """Store fairseq's recipe schema under the recipe's group as well as under its whole name.

    fairseq-hydra-train stores ``FairseqConfig`` in ConfigStore under ``--config-name``, where
    hydra finds it as the recipe's schema. ConfigStore reads a name with ``/`` as a group path,
    so ``pretrain/cssl_tiny``'s schema is never found, and the recipe composes without fairseq's
    defaults (``common.tpu`` and the like).
    """
    from fairseq.dataclass.configs import FairseqConfig
    from hydra.core.config_store import ConfigNode, ConfigStore

    store = ConfigStore.instance()
    for key, node in list(store.repo.items()):
        if "/" in key and isinstance(node, ConfigNode) and OmegaConf.get_type(node.node) is FairseqConfig:
            group, _, name = key.rpartition("/")
            store.store(group=group, name=name, node=FairseqConfig)


def register() -> None:
    """Import eqssl's fairseq components and the ``eqssl`` resolver (idempotent)."""
    import eqssl.criterions  # noqa: F401  (each import registers its dataclass with hydra)
    import eqssl.models  # noqa: F401
    import eqssl.tasks  # noqa: F401

    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, _resolve)
    store_schema_in_its_group()
    # Matching a recipe to FairseqConfig by name is how fairseq-hydra-train types every recipe,
    # its own examples' too; hydra deprecates it, and the notice is fairseq's to act on.
    # hydra attributes it to fairseq_cli.hydra_train, hydra.main or ``sys`` depending on where the
    # recipe's name is resolved, so the filter matches the notice's text alone.
    warnings.filterwarnings("ignore", message=r"\s*'[^']*' is validated against ConfigStore schema with the same name",
                            category=UserWarning)
