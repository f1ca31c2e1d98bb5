"""Draft training: data (sources, chat template, regeneration), target features, the TTT loss, the jitted step,
the resumable loop and its checkpoints."""
