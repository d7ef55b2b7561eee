from . import equilibrium_bestrq, equilibrium_wav2vec  # noqa: F401
