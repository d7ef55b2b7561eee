"""What the experiment and the commands measure of a checkpoint, one concept a module:

- :mod:`.gap`: the equilibrium gap (``eqssl-gap``);
- :mod:`.evaluation`: WER/CER of a fine-tuned CTC model (``eqssl-evaluate``);
- :mod:`.features`: frozen upstream features (a checkpoint's layers, or FBANK) and their cache;
- :mod:`.ctc_probe`: the CTC probe of letters (``eqssl-probe``);
- :mod:`.abx`: ABX phone discriminability, libri-light's definition (``eqssl-abx``);
- :mod:`.phone_probe`: the deterministic linear phone probe (``eqssl-probe --phones``).

``eqssl.cli`` parses arguments and prints; ``eqssl.experiment`` runs these for every checkpoint.
"""
