from . import equilibrium_pretraining  # noqa: F401
