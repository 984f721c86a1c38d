"""VCRD: Validity-Calibrated Reasoning Distillation.

Every training batch of prompts draws one teacher rollout and one student rollout per prompt (the
student's with its current weights), then distils the teacher into the student on both, weighting
each token's divergence by the relative local validity of the student's and teacher's proposed
next tokens:

    loss = lambda_T * LV-SKL(teacher-prefix tokens, w^T) + lambda_S * LV-SRKL(student-prefix tokens, w^S)

LV-SKL / LV-SRKL are the skew KL / skew reverse KL (DistiLLM) with per-token weights, computed by the
fused-linear kernels from the two models' last hidden states (no [N, V] logits in the training step).

Validity at a generated position t (prefix = prompt + rollout[:t], the hidden state at t predicts
token t + 1): a_S ~ q(.|c), a_T ~ p(.|c) the student's and the teacher's candidate next tokens, sampled
(seeded; ``candidate_tokens: greedy`` takes each argmax instead), and

    r_s, r_t = judge(prefix, a_S), judge(prefix, a_T)       a judge (a process reward model: token-probability
                                                            Math-Shepherd style or value-head Skywork style), or
    r_s = p_T(a_S),  r_t = sum of the top_k largest p_T^2   PRM-free (judge: null)

    weighting   w
    auto            ratio with a judge (Eq. 1), clamped_ratio PRM-free (Appendix 10.4): the default
    uniform         1
    ratio           r_s / (r_t + eps)
    clamped_ratio   exp(clip(gamma * log(r_s / (r_t + eps)), log clip[0], log clip[1]))
                    (PRM-free: distillkit.validity.teacher_likelihood_validity, one fused pass)
    r_s             r_s
    r_s_minus_r_t   r_s - r_t        (may be negative: the update then pushes away from the teacher)

Weights are constants (no gradient) and are computed chunk by chunk over positions, so the [N, V]
logits of a whole batch never exist. Each term sums over a rollout's tokens and averages over prompts
(Algorithm 1; ``normalization: token`` takes each term's mean over its own tokens instead).

Rollouts are drawn once before training and kept fixed (``rollouts: offline``, Appendix 10.2; ``online``
draws new ones every step); ``sft_steps`` fine-tunes the student on the teacher's rollouts first.

    distillkit vcrd --config configs/vcrd.yaml

The step is factored for tests and reuse: ``rollout`` -> ``final_hidden`` -> ``validity_weights`` ->
``vcrd_loss`` (``vcrd_step`` chains the last three).
"""
from distillkit.methods.vcrd.config import (  # noqa: F401
    CANDIDATE_TOKENS,
    NORMALIZATIONS,
    ROLLOUT_MODES,
    WEIGHTING_CHOICES,
    WEIGHTINGS,
    VcrdConfig,
)
from distillkit.methods.vcrd.runner import (  # noqa: F401
    RESUME_FREE_FIELDS,
    FixedRollout,
    VcrdObjective,
    cap_prompts,
    cli,
    load_models,
    load_prompts,
    merge_rollout_shards,
    offline_rollouts,
    run,
    sft_stage,
    shard_batches,
)
from distillkit.methods.vcrd.step import (  # noqa: F401
    IGNORE_INDEX,
    Rollouts,
    StepResult,
    ValidityWeights,
    build_rollouts,
    combine_validity,
    final_hidden,
    output_head,
    resolve_weighting,
    rollout,
    rollout_seed,
    target_positions,
    validity_weights,
    vcrd_loss,
    vcrd_step,
)
