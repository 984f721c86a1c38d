"""CoRD: collaborative step-wise multi-teacher decoding, scored by a meta-prover.

Each step, K teachers propose the next reasoning step for each of B beams; the meta-prover scores
the B x K candidates by the predictive perplexity of the ground-truth answer (see
:mod:`distillkit.methods.cord.meta_prover`); the best B survive. A beam ends at ``"</think>"`` or when
its token budget is spent (then ``"</think>"`` is appended); the teacher that wrote the chosen
trace's last step then writes the final answer. Baselines at equal cost (``baseline_cost``): ``greedy``
(B = 1, run as B independent trajectories, the best by the same score kept), ``curation`` (each teacher
writes n complete traces, the best by the same score is kept) and ``random`` (one of those traces picked
at random; ``random_selection: step`` picks one of the K proposals at random each step).

    distillkit cord --config configs/cord.yaml

Questions are independent: ``questions_in_flight`` of them are decoded at once (one batched teacher call per
teacher and step, one meta-prover call for all their candidates; greedy traces are those of one at a time),
and a run can be split over drivers with ``--num-shards N --shard-index i`` and merged with
``distillkit cord --merge-shards OUT SHARD...``.

Python:

    from distillkit.methods.cord import CordConfig, run
    summary = run(CordConfig(teachers=[...], meta_prover="...", input_path="q.jsonl", output_path="out.jsonl"))
"""
from distillkit.methods.cord.config import METHODS, SCORING_BACKENDS, CordConfig  # noqa: F401
from distillkit.methods.cord.decode import (  # noqa: F401
    DECODERS,
    Beam,
    DecodeResult,
    Scorer,
    decode_curation,
    decode_many,
    decode_one,
    decode_random,
    extend_beam,
    propose_steps,
    score_candidates,
    select_beams,
    write_answer,
)
from distillkit.methods.cord.runner import (  # noqa: F401
    begin_cord_run,
    cli,
    load_done,
    load_meta_prover,
    load_teachers,
    make_record,
    merge_shards,
    run,
    run_config_file,
)
from distillkit.methods.cord.summary import HIT_RATE_BINS, hit_rates, plot_hit_rates, summarize, write_summary  # noqa: F401
from distillkit.pipeline.answers import answers_match, extract_answer, normalize_answer  # noqa: F401
from distillkit.pipeline.data import question_seed, read_questions  # noqa: F401
from distillkit.pipeline.runs import append_record  # noqa: F401
