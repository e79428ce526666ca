"""Which patient a recording is of, from its metadata (standard library only).

Here, below train/ and deploy/, so that training runs can record the patient
(config.json ``patient``) and ``neurohand recalibrate`` can refuse a session of
another patient with the same rule.
"""


def recording_patient(metadata):
    """The patient a recording is of, as its metadata says, or None where it does not say.

    ``patient`` (written by ``simulate --session N`` for N > 0), else
    ``subject`` (``neurohand collect --subject``); for a simulated session 0,
    the simulator's seed (``--patient K`` is ``--seed K``).
    """
    if not isinstance(metadata, dict):
        return None
    for key in ("patient", "subject"):
        if metadata.get(key) is not None:
            return metadata[key]
    simulator = metadata.get("simulator")
    if metadata.get("source") == "synthetic" and isinstance(simulator, dict):
        config = simulator.get("config")
        if isinstance(config, dict) and config.get("seed") is not None:
            return config["seed"]
    return None


def recordings_patient(metadatas):
    """The one patient all recordings are of, or None where any does not say or two differ.

    A run trained on several patients' sessions (or on some that do not say)
    is no one patient's decoder: None leaves the patient check of
    ``neurohand recalibrate`` to sessions and bundles that both know.
    """
    patients = [recording_patient(metadata) for metadata in metadatas]
    if not patients or any(patient is None for patient in patients):
        return None
    if len(set(str(patient) for patient in patients)) != 1:
        return None
    return patients[0]
