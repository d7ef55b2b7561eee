"""What eqssl's recipes need from hydra before ``fairseq-hydra-train`` composes them.

fairseq imports a plugin (``common.user_dir``) only after hydra has composed the recipe, so on
its own a recipe could neither find eqssl from another working folder nor name eqssl's config
classes. eqssl's hydra plugin (``hydra_plugins/eqssl_recipes``) calls :func:`register` first:

* importing eqssl registers its task, criterion and model dataclasses in hydra's ConfigStore
  (fairseq's ``register_*`` decorators do that), so a recipe's defaults list can start from
  them (``- task: equilibrium_pretraining``) and every field is overridable as ``task.X=…``;
* the resolver ``${eqssl:user_dir}`` gives the installed package's folder, for
  ``common.user_dir``.
"""

from omegaconf import OmegaConf

RESOLVER = "eqssl"


def _resolve(name: str) -> str:
    """``${eqssl:user_dir}``: the installed eqssl package's absolute folder."""
    from eqssl.cli.user_dir import user_dir

    if name != "user_dir":
        raise ValueError(f"${{{RESOLVER}:{name}}}: unknown; eqssl resolves only ${{{RESOLVER}:user_dir}}")
    return user_dir()


def register() -> None:
    """Import eqssl's fairseq components and the ``eqssl`` resolver (idempotent)."""
    import eqssl.criterions  # noqa: F401  (each import registers its dataclass with hydra)
    import eqssl.models  # noqa: F401
    import eqssl.tasks  # noqa: F401

    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, _resolve)
