from . import equilibrium_wav2vec  # noqa: F401
