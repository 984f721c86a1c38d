"""The pipeline's plumbing shared by every method: configs (``config``; what they need from the machine:
``environment``), data, questions and prompts (``data``),
the trainer (``train``), evaluation (``evaluate``), answer extraction (``answers``) and JSONL outputs
with resume (``runs``)."""
