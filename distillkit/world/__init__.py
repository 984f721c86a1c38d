"""The tiny synthetic reasoning world used by the demo and the tests.

problems  chains of one-digit operations mod 10 with exact answers, "### Step" traces, flawed
          traces (one systematic error per kind of step) and an independent evaluator
tiny      the character tokenizer and tiny Hugging Face causal LMs (built offline)
models    the shipped teachers, meta-prover and student (assets/, trained by scripts/train_world.py)
demo      `distillkit demo`: CoRD, MoT, VCRD and QR-Distill end to end on a laptop CPU

Nothing heavy is imported here (``import distillkit`` stays light).
"""
