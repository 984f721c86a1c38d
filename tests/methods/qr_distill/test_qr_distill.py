"""QR-Distill: paths + filtering, the router's gradient and behaviour, the mutual loss against a float64
reference, S = 3 students, ablations, exact resume, config errors and the CLI end to end."""
from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch
import yaml

from _tolerance import assert_eager_budget, ulp
from distillkit.methods.qr_distill import (
    DEFAULT_STYLES,
    STYLE_TEMPLATES,
    PathItem,
    QRCollator,
    QRDistillConfig,
    collect_paths,
    filter_paths,
    parse_judgement,
    path_key,
    run,
)
from distillkit.methods.qr_distill import router as qr
from distillkit.pipeline.data import Example, SFTCollator
from distillkit.pipeline.train import TrainConfig, Trainer
from distillkit.teachers.base import Proposal, Teacher
from distillkit.world.tiny import build_tokenizer, save_tiny_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _write(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny students of two architectures and three sizes sharing one tokenizer, a tiny BERT encoder,
    and a questions file."""
    from transformers import BertConfig, BertModel

    root = tmp_path_factory.mktemp("qr")
    tok = build_tokenizer()
    small = dict(num_layers=1, num_heads=2)
    students = [save_tiny_checkpoint(root / "llama32", arch="llama", tokenizer=tok, hidden_size=32, seed=1, **small),
                save_tiny_checkpoint(root / "qwen48", arch="qwen2", tokenizer=tok, hidden_size=48, seed=2, **small),
                save_tiny_checkpoint(root / "llama24", arch="llama", tokenizer=tok, hidden_size=24, seed=3, **small)]
    bert = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=256, pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        BertModel(bert).save_pretrained(root / "encoder")
    tok.save_pretrained(root / "encoder")
    questions = [{"id": f"q{i}", "question": f"{i % 5} + {i % 3}", "answer": str(i % 5 + i % 3)} for i in range(4)]
    return {"root": root, "tok": tok, "students": students, "encoder": str(root / "encoder"),
            "questions": _write(root / "questions.jsonl", questions), "rows": questions}


def _question_of(prompt: str) -> str:
    return prompt.split("Question: ", 1)[1].split("\n", 1)[0]


class ScriptedTeacher(Teacher):
    """Answers "a + b" questions; wrong in the styles listed in ``wrong``, right-by-luck (flagged
    "LUCK") in ``lucky``; counts the prompts it was asked."""

    def __init__(self, name="scripted", wrong=("backward",), lucky=("program-based",)):
        self.name, self.wrong, self.lucky, self.calls = name, set(wrong), set(lucky), []

    def propose(self, prefixes, *, n=1, max_new_tokens=128, stop=None, temperature=0.0, seed=None):
        out = []
        for p in prefixes:
            style = next(s for s, t in STYLE_TEMPLATES.items() if t.split("{question}")[1] in p)
            self.calls.append(style)
            a, b = (int(x) for x in _question_of(p).split(" + "))
            ans = a + b + (1 if style in self.wrong else 0)
            note = " LUCK" if style in self.lucky else ""
            out.append([Proposal(f" [{style}]{note} {a} + {b} = {ans}. The final answer is {ans}.", 12, True, "eos")
                        for _ in range(n)])
        return out


class ScriptedJudge(Teacher):
    """Rejects paths flagged LUCK, accepts the others."""
    name = "judge"

    def propose(self, prefixes, *, n=1, max_new_tokens=128, stop=None, temperature=0.0, seed=None):
        return [[Proposal(" No, luck." if "LUCK" in p else " Yes.", 3, True, "eos")] for p in prefixes]


def _cfg(world, name, **kw):
    base = dict(input_path=world["questions"], output_dir=str(world["root"] / name), teachers=["scripted"],
                students=world["students"][:2], router_encoder=world["encoder"], max_steps=3, batch_size=4, lr=1e-3,
                progress=False, save_every=0, log_every=1, seed=3, judge_mode="yes_no")
    base.update(kw)
    return QRDistillConfig(**base)


# ----------------------------------------------------------------------------------------------
# 1-2. Paths and filtering
# ----------------------------------------------------------------------------------------------
def test_paths_in_six_styles_resume_after_a_torn_write(world):
    cfg = _cfg(world, "paths", judge="judge")
    teacher = ScriptedTeacher()
    records = collect_paths(cfg, teachers=[teacher], judge=ScriptedJudge())
    assert len(records) == 4 * len(DEFAULT_STYLES) and sorted({r["style"] for r in records}) == sorted(DEFAULT_STYLES)
    assert all(r["prompt"].startswith("Question: ") and r["response"] for r in records)
    assert all({"answer_correct", "final_answer", "judge_output", "judge_score", "judge_valid"} <= set(r)
               for r in records)
    # A crash: the last question's records are lost and a torn line is left behind.
    lines = open(cfg.paths_file()).read().splitlines(keepends=True)
    keep = [ln for ln in lines if json.loads(ln)["qid"] != "q3"]
    with open(cfg.paths_file(), "w") as f:
        f.writelines(keep)
        f.write(lines[-1][:25])
    again = ScriptedTeacher()
    records2 = collect_paths(cfg, teachers=[again], judge=ScriptedJudge())
    assert len(again.calls) == len(DEFAULT_STYLES)  # only q3 was generated again
    assert sorted(r["id"] for r in records2) == sorted(r["id"] for r in records)
    assert all(line.endswith("\n") and json.loads(line) for line in open(cfg.paths_file()))
    # Fewer styles (an ablation in the same directory): only those paths, nothing generated.
    fewer = _cfg(world, "paths", judge="judge", styles=["vanilla", "backward"])
    unused = ScriptedTeacher()
    assert {r["style"] for r in collect_paths(fewer, teachers=[unused], judge=ScriptedJudge())} == {"vanilla",
                                                                                                     "backward"}
    assert unused.calls == []


def test_filter_keeps_exactly_the_correct_and_judged_valid_paths(world):
    cfg = _cfg(world, "filter", judge="judge")
    records = collect_paths(cfg, teachers=[ScriptedTeacher()], judge=ScriptedJudge())
    kept, stats = filter_paths(records, cfg)
    want = {path_key(q["id"], s, "scripted", 0) for q in world["rows"] for s in DEFAULT_STYLES
            if s not in ("backward", "program-based")}
    assert {r["id"] for r in kept} == want
    assert stats["total"] == 24 and stats["answer_correct"] == 20 and stats["judge_valid"] == 20
    assert stats["kept"] == 16 and stats["kept_per_style"]["backward"] == 0
    by_style = {r["style"]: r for r in records if r["qid"] == "q1"}
    assert by_style["backward"]["answer_correct"] is False and by_style["backward"]["judge_valid"] is True
    assert by_style["program-based"]["answer_correct"] is True and by_style["program-based"]["judge_valid"] is False
    # Ablations: each filter alone, and none.
    only_answer, _ = filter_paths(records, _cfg(world, "filter", judge="judge", filter_judge=False))
    assert {r["style"] for r in only_answer} == set(DEFAULT_STYLES) - {"backward"}
    only_judge, _ = filter_paths(records, _cfg(world, "filter", judge="judge", filter_answer=False))
    assert {r["style"] for r in only_judge} == set(DEFAULT_STYLES) - {"program-based"}
    assert len(filter_paths(records, _cfg(world, "filter", filter_answer=False, filter_judge=False))[0]) == 24


def test_paths_input_random_routing_run(world, tmp_path):
    """Paths written elsewhere (no teachers): answers re-checked, wrong ones filtered; random routing
    needs no encoder; the students are saved and reload."""
    from transformers import AutoModelForCausalLM

    rows = [{"id": f"p{i}", "question": f"{i} + 1", "answer": str(i + 1), "style": "mine" if i % 2 else "yours",
             "response": f" {i} + 1 = {i + 1 + (i == 3)}. The final answer is {i + 1 + (i == 3)}."} for i in range(6)]
    paths = _write(tmp_path / "given.jsonl", rows)
    cfg = QRDistillConfig(paths_input=paths, teachers=[], output_dir=str(tmp_path / "run"),
                          students=world["students"][1:], routing="random", router_encoder=None, max_steps=2,
                          batch_size=3, lr=1e-3, progress=False, device="cpu")
    summary = run(cfg)
    assert summary["paths"]["total"] == 6 and summary["paths"]["kept"] == 5 and summary["routing"] == {}
    assert summary["paths"]["kept_per_style"] == {"mine": 2, "yours": 3}
    assert not os.path.exists(tmp_path / "run" / "router.pt")
    for path in summary["students"]:
        AutoModelForCausalLM.from_pretrained(path)


@pytest.mark.parametrize("text,mode,want", [
    (" Yes, every step holds.", "yes_no", (True, 1.0)), ("NO - step 2 is wrong", "yes_no", (False, 0.0)),
    ("Nothing readable", "yes_no", (None, None)), ("Yesterday no", "yes_no", (False, 0.0)),
    (" 8/10", "score", (True, 8.0)), ("score: 6.5", "score", (False, 6.5)), ("n/a", "score", (None, None)),
])
def test_parse_judgement(text, mode, want):
    assert parse_judgement(text, mode=mode, threshold=7.0) == want


def test_judge_unreadable_verdict_is_rejected_and_custom_styles(world):
    class Mumbler(Teacher):
        name = "mumbler"

        def propose(self, prefixes, **kw):
            return [[Proposal("hmm", 1, True, "eos")] for _ in prefixes]

    cfg = _cfg(world, "mumble", judge="judge", styles=["chain-of-thought", "mine"],
               style_templates={"mine": "Question: {question}\nMy way, {literal braces} kept.\n"})
    assert "{literal braces}" in cfg.templates()["mine"]

    class Echo(Teacher):
        name = "echo"

        def propose(self, prefixes, **kw):
            return [[Proposal(" The final answer is " + str(sum(int(x) for x in _question_of(p).split(" + "))),
                              5, True, "eos")] for p in prefixes]

    records = collect_paths(cfg, teachers=[Echo()], judge=Mumbler())
    assert len(records) == 8 and all(r["answer_correct"] and r["judge_valid"] is None for r in records)
    assert any("{literal braces}" in r["prompt"] for r in records)
    assert filter_paths(records, cfg)[0] == []


# ----------------------------------------------------------------------------------------------
# 3. Routing
# ----------------------------------------------------------------------------------------------
def test_straight_through_gumbel_forward_is_hard_backward_is_soft():
    torch.manual_seed(0)
    logits = torch.randn(64, 3, dtype=torch.float64, requires_grad=True)
    y, y_soft = qr.gumbel_topk_straight_through(logits, tau=0.7, k=1)
    assert torch.equal(y.detach().sum(1), torch.ones(64)) and set(y.detach().unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(y.detach().argmax(1), y_soft.argmax(1))
    w = torch.randn(64, 3, dtype=torch.float64)
    (g,) = torch.autograd.grad((y * w).sum(), logits, retain_graph=True)
    (g_soft,) = torch.autograd.grad((y_soft * w).sum(), logits)
    torch.testing.assert_close(g, g_soft, rtol=0, atol=0)  # y = hard - soft.detach() + soft: the same graph
    y2, _ = qr.gumbel_topk_straight_through(logits, k=2)
    assert torch.equal(y2.detach().sum(1), torch.full((64,), 2.0, dtype=torch.float64))
    # exact values 0 and log 4, up to a few float32 roundings of log 4-sized terms (exp(-50) terms are ~1e-21)
    assert float(qr.balance_loss(torch.zeros(5, 4))) == pytest.approx(0.0, abs=4 * ulp(torch.float32) * math.log(4))
    one_student = torch.tensor([[50.0, 0, 0, 0]] * 5)
    assert float(qr.balance_loss(one_student)) == pytest.approx(math.log(4), rel=4 * ulp(torch.float32))


def test_router_learns_from_synthetic_losses():
    """ce is lower for student 0 on style-A features and for student 1 on style-B features: the
    straight-through router alone (no student in the loop) must route A -> 0 and B -> 1."""
    torch.manual_seed(0)
    feats = torch.cat([torch.randn(32, 8) + 2.0, torch.randn(32, 8) - 2.0])
    ce = torch.tensor([[1.0, 3.0]] * 32 + [[3.0, 1.0]] * 32)
    router = qr.Router(8, 2, hidden=16)
    opt = torch.optim.Adam(router.parameters(), lr=1e-2)
    for _ in range(60):
        logits = router(feats)
        y, _ = qr.gumbel_topk_straight_through(logits)
        loss = (y * ce).sum() / len(ce) + 0.01 * qr.balance_loss(logits)
        opt.zero_grad()
        loss.backward()
        opt.step()
    probs = qr.routing_probabilities(router, feats)
    assert probs[:32, 0].mean() > 0.9 and probs[32:, 1].mean() > 0.9


def _items(texts_by_style, tok_prompt="Q:"):
    items, i = [], 0
    for style, texts in texts_by_style.items():
        for t in texts:
            items.append(PathItem(Example(f"p{i}", tok_prompt, t, "0", True), style, i))
            i += 1
    return items


def _load(paths):
    from transformers import AutoModelForCausalLM

    return [AutoModelForCausalLM.from_pretrained(p) for p in paths]


def test_router_gradient_flows_through_the_students_losses(world):
    """With lambda_1 = lambda_2 = 0 the loss is only sum_s y_bs ce_bs: the router still gets a
    gradient (the upstream gate did not), and each student's gradient is that of its routed rows."""
    students = _load(world["students"][:2])
    model = qr.QRDistillModel(students, shared_dim=16, router_in_dim=32, router_hidden=16)
    items = _items({"a": [" 1 + 2 = 3.", " 4 + 4 = 8.", " 0 + 7 = 7."], "b": [" x y z", " q r s t", " m n"]})
    feats = torch.randn(len(items), 32)
    batch = QRCollator([world["tok"]] * 2, 64, feats)(items)
    settings = qr.LossSettings(routing="gumbel_top1", capacity_factor=None, lambda_1=0.0, lambda_2=0.0, mutual=False,
                               entropy_reg=False)
    torch.manual_seed(11)
    loss, metrics = qr.qr_loss(model, batch, settings)
    loss.backward()
    router_grad = sum(float(p.grad.abs().sum()) for p in model.router.parameters())
    assert router_grad > 0
    torch.manual_seed(11)  # the same Gumbel draw gives the same hard assignment
    y, _ = qr.gumbel_topk_straight_through(model.router(batch["route_features"]))
    y = y.detach()
    assert metrics["share_s0"] == pytest.approx(float(y[:, 0].mean()))  # a count / batch size: one rounding
    for s, student in enumerate(students):
        rows = y[:, s].bool()
        got = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in student.parameters()]
        student.zero_grad()
        # the routed rows alone, by plain PyTorch: float32 (the error budget) and float64 (the truth)
        manual = {}
        for dtype, m in ((torch.float32, student), (torch.float64, copy.deepcopy(student).double())):
            if rows.any():
                ce, _, _ = qr.student_forward(m, {k: v[rows] for k, v in batch[f"student{s}"].items()})
                (ce.sum() / len(items)).backward()
            manual[dtype] = [p.grad if p.grad is not None else torch.zeros_like(p) for p in m.parameters()]
        for g, eager, truth in zip(got, manual[torch.float32], manual[torch.float64]):
            assert_eager_budget(g, eager, truth, scale="tensor")


def _pretrain(student, tok, texts, steps=25):
    from distillkit.pipeline.data import sft_loss

    exs = [Example(f"t{i}", "Q:", t, "0") for i, t in enumerate(texts)]
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    col = SFTCollator(tok, 64)
    student.train()
    for _step in range(steps):
        loss, _ = sft_loss(student, col(exs))
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_routing_moves_each_style_toward_the_student_that_fits_it(world, tmp_path):
    """Student 0 was trained on style-A paths and student 1 on style-B paths, so each has the lower
    loss on its style; training (students frozen) must move the router's assignment of A to 0 and
    of B to 1, starting from a router that does not prefer either."""
    from distillkit.methods.qr_distill import load_encoder, route_features

    tok = world["tok"]
    style_a = [f" {i} + {i} = {2 * i}. The final answer is {2 * i}." for i in range(6)]
    style_b = [f" Program: print({i}*3) prints {3 * i}; so {3 * i}." for i in range(6)]
    students = _load(world["students"][:2])
    _pretrain(students[0], tok, style_a)
    _pretrain(students[1], tok, style_b)
    for m in students:
        m.requires_grad_(False)
    items = _items({"A": style_a, "B": style_b})
    records = [{"response": it.example.response} for it in items]
    cfg = _cfg({**world, "root": tmp_path}, "route")
    feats = route_features(cfg, records, torch.device("cpu"), load_encoder(world["encoder"], "cpu"))
    for s, (mine, other) in enumerate(((slice(0, 6), slice(6, 12)), (slice(6, 12), slice(0, 6)))):
        batch = QRCollator([tok], 64)(items)["student0"]
        ce = qr.student_forward(students[s], batch)[0]
        assert ce[mine].mean() < ce[other].mean() - 1.0  # the constructed case holds
    torch.manual_seed(0)
    model = qr.QRDistillModel(students, shared_dim=16, router_in_dim=feats.shape[1], router_hidden=32)
    model.router.fit_feature_scale(feats)  # as run() does
    before = qr.routing_probabilities(model.router, feats)
    router_init = {k: v.detach().clone() for k, v in model.router.named_parameters()}
    settings = qr.LossSettings(mutual=False, lambda_2=0.01)
    tcfg = TrainConfig(output_dir=str(tmp_path / "route"), max_steps=40, batch_size=6, lr=1e-2, progress=False,
                       log_every=10)
    Trainer(model, tcfg, items, QRCollator([tok, tok], 64, feats), lambda m, b: qr.qr_loss(m, b, settings)).train()
    after = qr.routing_probabilities(model.router, feats)
    assert all(not torch.equal(router_init[k], v) for k, v in model.router.named_parameters())
    a, b = slice(0, 6), slice(6, 12)
    assert after[a, 0].mean() > 0.8 and after[b, 1].mean() > 0.8, (before, after)
    assert after[a, 0].mean() > before[a, 0].mean() + 0.2 and after[b, 1].mean() > before[b, 1].mean() + 0.2


# ----------------------------------------------------------------------------------------------
# 4. Mutual-student distillation against float64
# ----------------------------------------------------------------------------------------------
def _mutual_case(dtype, normalize, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, D, sizes, lengths = 5, 6, [4, 7, 3], [9, 6, 11]
    hiddens = [torch.randn(B, T, H, generator=g, dtype=dtype).requires_grad_() for H, T in zip(sizes, lengths)]
    masks = [torch.rand(B, T, generator=g) > 0.4 for T in lengths]
    masks[1][2] = False  # row 2: student 1 sees no response token -> the row is not valid
    for m in masks:
        m[0, -1] = True
    projs = [torch.nn.Linear(H, D).to(dtype) for H in sizes]
    comp = torch.nn.Linear(D, 1).to(dtype)
    with torch.no_grad():
        for lin in projs + [comp]:
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g))
            lin.bias.copy_(torch.randn(lin.bias.shape, generator=g))
    ce = torch.rand(B, 3, generator=g, dtype=dtype) * 3
    return hiddens, masks, projs, comp, ce


def _mutual_impl(hiddens, masks, projs, comp, ce, normalize, tau):
    z = torch.stack([qr.shared_representation(qr.masked_mean(h, m), p, normalize=normalize)
                     for h, m, p in zip(hiddens, masks, projs)], 1)
    valid = torch.stack([m.any(1) for m in masks], 1).all(1)
    t = qr.mutual_loss(z, ce, valid, comp, competence_tau=tau)
    return t.align, t.competence


def _params(hiddens, projs, comp):
    return [*hiddens, *[q for p in projs for q in (p.weight, p.bias)], comp.weight, comp.bias]


@pytest.mark.parametrize("normalize", [True, False])
def test_mutual_loss_and_gradients_match_float64_reference(normalize):
    tau = 0.7
    h64, masks, p64, c64, ce64 = _mutual_case(torch.float64, normalize)
    ref_align, ref_comp = qr.mutual_loss_reference(h64, masks, [p.weight for p in p64], [p.bias for p in p64],
                                                   c64.weight, c64.bias, ce64, normalize=normalize, competence_tau=tau)
    ref_grads = torch.autograd.grad(ref_align + 0.3 * ref_comp, _params(h64, p64, c64), allow_unused=True)
    # Same inputs through the vectorised implementation, in float64 (same formula) and float32.
    # float32: within twice the float32 error of the reference formula itself; float64: the same formula
    # regrouped, sums of <= ~100 terms of condition ~1, so <= ~100 x 2^-52 ~ 2e-14, far below 1e-10
    for dtype, tol in ((torch.float64, dict(rtol=1e-10, atol=1e-12)), (torch.float32, None)):
        h = [x.detach().to(dtype).requires_grad_() for x in h64]
        projs = [torch.nn.Linear(p.in_features, p.out_features).to(dtype) for p in p64]
        comp = torch.nn.Linear(c64.in_features, 1).to(dtype)
        with torch.no_grad():
            for dst, src in zip(projs + [comp], p64 + [c64]):
                dst.weight.copy_(src.weight)
                dst.bias.copy_(src.bias)
        align, comp_loss = _mutual_impl(h, masks, projs, comp, ce64.to(dtype), normalize, tau)
        grads = torch.autograd.grad(align + 0.3 * comp_loss, _params(h, projs, comp), allow_unused=True)
        if tol is None:
            h32 = [x.detach().float().requires_grad_() for x in h64]
            p32 = [torch.nn.Linear(p.in_features, p.out_features) for p in p64]
            c32 = torch.nn.Linear(c64.in_features, 1)
            with torch.no_grad():
                for dst, src in zip(p32 + [c32], p64 + [c64]):
                    dst.weight.copy_(src.weight)
                    dst.bias.copy_(src.bias)
            ref32_align, ref32_comp = qr.mutual_loss_reference(
                h32, masks, [p.weight for p in p32], [p.bias for p in p32], c32.weight, c32.bias, ce64.float(),
                normalize=normalize, competence_tau=tau)
            ref32_grads = torch.autograd.grad(ref32_align + 0.3 * ref32_comp, _params(h32, p32, c32),
                                              allow_unused=True)
            assert_eager_budget(align, ref32_align, ref_align, what="align")
            assert_eager_budget(comp_loss, ref32_comp, ref_comp, what="competence")
            # one scale for all gradients: some are exactly 0 in float64 by cancellation, not in float32
            grad_scale = max(g.abs().max().item() for g in ref_grads if g is not None)
            for i, (gv, ge, gr) in enumerate(zip(grads, ref32_grads, ref_grads)):
                gr = torch.zeros_like(gv if gv is not None else ge) if gr is None else gr
                gv = torch.zeros_like(gr) if gv is None else gv
                ge = torch.zeros_like(gr) if ge is None else ge
                assert_eager_budget(gv, ge, gr, scale=grad_scale, what=f"gradient {i}")
            continue
        torch.testing.assert_close(align.double(), ref_align.detach(), **tol)
        torch.testing.assert_close(comp_loss.double(), ref_comp.detach(), **tol)
        for i, (gv, gr) in enumerate(zip(grads, ref_grads)):
            gv = torch.zeros_like(gr) if gv is None else gv.double()
            gr = torch.zeros_like(gv) if gr is None else gr
            torch.testing.assert_close(gv, gr, **tol, msg=f"gradient {i} ({dtype})")
    # The ensemble and the regressor input are stop-gradients: L_align never reaches the
    # regressor, and L_comp only reaches the regressor.
    assert grads[0].abs().sum() > 0 and grads[-1].abs().sum() > 0
    assert float(ref_align.detach()) > 0 and float(ref_comp.detach()) > 0


def test_mutual_loss_gradient_in_closed_form():
    """With the ensemble a stop-gradient, d L_align / d z_bs = 2 (z_bs - e_b) / (|valid| S D) on valid
    rows and 0 elsewhere (gradcheck does not apply: finite differences also move the target)."""
    g = torch.Generator().manual_seed(1)
    B, S, D = 5, 3, 6
    z = torch.randn(B, S, D, generator=g, dtype=torch.float64, requires_grad=True)
    ce = torch.rand(B, S, generator=g, dtype=torch.float64)
    valid = torch.tensor([True, True, False, True, True])
    comp = torch.nn.Linear(D, 1).double()
    t = qr.mutual_loss(z, ce, valid, comp)
    (grad,) = torch.autograd.grad(t.align, z)
    e = (t.weights.unsqueeze(-1) * z).sum(1, keepdim=True)
    want = 2 * (z - e) / (int(valid.sum()) * S * D) * valid.view(B, 1, 1)
    # float64 both sides, a few roundings of condition ~1 (~1e-15): far inside 1e-12, far from a wrong formula
    torch.testing.assert_close(grad, want.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(t.weights.sum(1), torch.ones(B, dtype=torch.float64))


def test_mutual_loss_rejects_bad_shapes():
    comp = torch.nn.Linear(4, 1)
    with pytest.raises(ValueError, match="z:"):
        qr.mutual_loss(torch.zeros(2, 4), torch.zeros(2, 2), torch.ones(2, dtype=torch.bool), comp)
    with pytest.raises(ValueError, match="ce:"):
        qr.mutual_loss(torch.zeros(2, 3, 4), torch.zeros(2, 2), torch.ones(2, dtype=torch.bool), comp)
    with pytest.raises(ValueError, match="valid:"):
        qr.mutual_loss(torch.zeros(2, 3, 4), torch.zeros(2, 3), torch.ones(2), comp)


# ----------------------------------------------------------------------------------------------
# S = 3, ablations, exact resume
# ----------------------------------------------------------------------------------------------
TEXTS = {"a": [" 1 + 2 = 3. The final answer is 3.", " 2 + 2 = 4. The final answer is 4."],
         "b": [" Program: print(3) prints 3.", " Facts: 5 is five; so 5."]}


@pytest.mark.parametrize("routing,top_k,mutual,entropy,form", [
    ("gumbel_top1", 1, True, True, "token"), ("topk", 2, True, True, "pooled"), ("bernoulli", 1, True, True, "token"),
    ("learned", 2, True, True, "pooled"), ("random", 1, True, False, "token"), ("all", 1, False, False, "token"),
    ("bernoulli", 1, False, False, "token"),
])
def test_three_students_every_ablation(world, routing, top_k, mutual, entropy, form):
    students = _load(world["students"])
    items = _items(TEXTS)
    feats = torch.randn(len(items), 32)
    learned = routing not in ("random", "all")
    model = qr.QRDistillModel(students, shared_dim=20, router_in_dim=32 if learned else None, router_hidden=16)
    batch = QRCollator([world["tok"]] * 3, 64, feats if learned else None)(items)
    # scope all: every projection is aligned on every path, whichever students the paths are routed to
    settings = qr.LossSettings(routing=routing, top_k=top_k, mutual=mutual, entropy_reg=entropy, mutual_form=form,
                               mutual_scope="all", competence="path" if form == "pooled" else "student")
    torch.manual_seed(0)
    loss, metrics = qr.qr_loss(model, batch, settings)
    loss.backward()
    assert torch.isfinite(loss)
    shares = [metrics[f"share_s{s}"] for s in range(3)]
    assert sum(shares) == pytest.approx(1.0)  # shares of the batch's routes
    assert ("align" in metrics) == mutual and ("balance" in metrics) == (entropy and learned)
    if routing in ("gumbel_top1", "learned", "topk", "random"):  # exactly k routes per path
        assert metrics["co_routed"] == (1.0 if top_k > 1 else 0.0)
    if learned:
        assert sum(float(p.grad.abs().sum()) for p in model.router.parameters()) > 0
    if mutual:  # the projections of all three sizes receive the alignment gradient
        assert all(p.weight.grad is not None and p.weight.grad.abs().sum() > 0 for p in model.projections)
        scores = model.competence.weight if form == "pooled" else model.competence_scores
        assert scores.grad.abs().sum() > 0


def test_interrupted_training_resumes_exactly(world, tmp_path):
    """The container (students + router + projections + regressor), the optimizer and the RNG that
    draws the Gumbel noise are checkpointed: a crash and rerun gives the uninterrupted weights."""
    items = _items(TEXTS)
    feats = torch.randn(len(items), 32, generator=torch.Generator().manual_seed(0))
    settings = qr.LossSettings()

    def trainer(out, on_step=None):
        torch.manual_seed(5)
        model = qr.QRDistillModel(_load(world["students"][:2]), shared_dim=16, router_in_dim=32, router_hidden=16)
        tcfg = TrainConfig(output_dir=str(tmp_path / out), max_steps=4, batch_size=3, lr=1e-2, save_every=2,
                           progress=False, log_every=1)
        return model, Trainer(model, tcfg, items, QRCollator([world["tok"]] * 2, 64, feats),
                              lambda m, b: qr.qr_loss(m, b, settings), on_step=on_step)

    straight, t = trainer("straight")
    t.train()

    def crash(step, _):
        if step == 3:
            raise KeyboardInterrupt

    _, t = trainer("crash", crash)
    with pytest.raises(KeyboardInterrupt):
        t.train()
    torch.manual_seed(123)  # a different process state: the checkpoint must restore it
    resumed, t = trainer("crash")
    t.train()
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)  # resume is bit-exact


def test_lora_students(world, tmp_path):
    pytest.importorskip("peft", reason="peft is not installed (it needs accelerate and psutil, which are not "
                                       "installed here): LoRA is optional (lora_r > 0)")
    cfg = _cfg(world, "lora", lora_r=4, lora_targets=["q_proj", "v_proj"], routing="all", max_steps=2)
    from distillkit.methods.qr_distill import load_students

    students, _ = load_students(cfg, "cpu")
    trainable = [n for n, p in students[0].named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)
    summary = run(cfg, teachers=[ScriptedTeacher()])
    assert os.path.isdir(summary["students"][0])


def test_lora_without_peft_says_how_to_install(world, monkeypatch):
    import sys

    from distillkit.methods.qr_distill import apply_lora

    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ImportError, match="lora_r=4 needs peft"):
        apply_lora(torch.nn.Linear(2, 2), _cfg(world, "x", lora_r=4))


# ----------------------------------------------------------------------------------------------
# Config and CLI
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,field", [
    (dict(students=["a"]), "students"), (dict(routing="moe"), "routing"),
    (dict(router_encoder=None), "router_encoder"), (dict(styles=["haiku"]), "styles"),
    (dict(judge_mode="stars"), "judge_mode"), (dict(lambda_1=-1.0), "lambda_1"), (dict(route_top_k=3), "route_top_k"),
    (dict(gumbel_tau=0.0), "gumbel_tau"), (dict(teachers=[], paths_input=None), "teachers"),
    (dict(style_templates={"x": "no placeholder"}, styles=["x"]), "style_templates"),
    (dict(judge_prompt="{question}"), "judge_prompt"), (dict(batch_size=0), "batch_size"),
    (dict(teacher_backend="openai"), "teacher_backend"), (dict(student_names=["a", "a"]), "student_names"),
    (dict(prompt_template="no question"), "prompt_template"), (dict(device="tpu"), "device"),
    (dict(lora_dropout=1.0), "lora_dropout"),
])
def test_config_errors_name_the_field(world, kw, field):
    with pytest.raises(ValueError, match=field):
        _cfg(world, "bad", **kw)


def test_shipped_yaml_is_a_valid_config():
    from distillkit.pipeline.config import load_config

    cfg = load_config(QRDistillConfig, os.path.join(REPO, "configs", "qr_distill.yaml"))
    assert cfg.routing == "learned" and len(cfg.students) == 2 and cfg.styles == DEFAULT_STYLES
    header = open(os.path.join(REPO, "configs", "qr_distill.yaml")).read().splitlines()[:5]
    assert any("distillkit qr-distill --config configs/qr_distill.yaml" in line for line in header)


def test_cli_bad_field_exits_2_naming_it(world, tmp_path, capsys):
    from distillkit.cli import main

    cfg_path = tmp_path / "bad.yaml"
    cfg_path.write_text(yaml.safe_dump({"input_path": "q.jsonl", "teachers": ["t"], "students": ["a", "b"],
                                        "routing": "random", "lambda_2": -3}))
    with pytest.raises(SystemExit) as exc:
        main(["qr-distill", "--config", str(cfg_path)])
    assert exc.value.code == 2 and "lambda_2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["qr-distill", "--config", str(cfg_path), "--routing", "random", "--bogus", "1"])


def test_cli_end_to_end_on_tiny_models(world, tmp_path):
    """`distillkit qr-distill --config`: a real HF teacher writes paths in two styles, a real HF judge
    grades them, filtering is off (tiny random models never answer right), two students of different
    architectures and sizes train with a learned router; a rerun resumes without redoing anything."""
    from transformers import AutoModelForCausalLM

    from distillkit.cli import main

    tok = world["tok"]
    teacher = save_tiny_checkpoint(tmp_path / "teacher", arch="qwen2", tokenizer=tok, hidden_size=32, num_layers=1,
                                   num_heads=2, seed=7)
    out = tmp_path / "run"
    cfg = {"input_path": world["questions"], "output_dir": str(out), "teachers": [teacher], "teacher_names": ["t"],
           "styles": ["chain-of-thought", "backward"], "max_new_tokens": 12, "temperature": 1.0,
           "judge": teacher, "judge_max_new_tokens": 3, "filter_answer": False, "filter_judge": False,
           "students": world["students"][:2], "student_names": ["llama", "qwen"], "router_encoder": world["encoder"],
           "max_length": 96, "max_steps": 4, "batch_size": 4, "lr": 1e-3, "router_lr": 1e-2, "save_every": 2,
           "log_every": 1, "device": "cpu", "eval_data": world["questions"], "eval_limit": 2,
           "eval_max_new_tokens": 4, "progress": False}
    cfg_path = tmp_path / "qr.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert main(["qr-distill", "--config", str(cfg_path)]) == 0
    records = [json.loads(line) for line in open(out / "paths.jsonl")]
    assert len(records) == 8 and {r["style"] for r in records} == {"chain-of-thought", "backward"}
    assert all("judge_output" in r and "answer_correct" in r for r in records)
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert {"ce_routed", "align", "competence_kl", "balance", "share_s0", "share_s1"} <= set(metrics[-1])
    summary = json.loads(open(out / "qr_summary.json").read())
    assert summary["paths"]["kept"] == 8 and set(summary["eval"]) == {"llama", "qwen"}
    assert set(summary["routing"]) == {"chain-of-thought", "backward"}
    router = torch.load(out / "router.pt")
    assert router["students"] == ["llama", "qwen"]
    assert set(router["router"]) == set(qr.Router(router["in_dim"], 2, router["hidden"]).state_dict())
    state = torch.load(out / "trainer_state.pt", weights_only=False)
    assert state["step"] == 4 and any(k.startswith("router.") for k in state["model"])
    reloaded = AutoModelForCausalLM.from_pretrained(out / "students" / "qwen")
    torch.testing.assert_close(reloaded.state_dict()["lm_head.weight"], state["model"]["students.1.lm_head.weight"])
    # A rerun: no generation (paths complete), the trainer finds step 4 and stops, same outputs.
    mtime = os.path.getmtime(out / "paths.jsonl")
    assert main(["qr-distill", "--config", str(cfg_path), "--no-progress"]) == 0
    assert os.path.getmtime(out / "paths.jsonl") == mtime
    assert len(open(out / "metrics.jsonl").read().splitlines()) == 4


def test_router_standardises_large_features():
    """Hidden-state features of large magnitude (as an LLM's are) must not saturate a fresh router: after
    fit_feature_scale its initial routing is soft, and the scale travels in the router's state dict."""
    torch.manual_seed(0)
    feats = torch.randn(64, 32) * 40.0 + torch.linspace(-100, 100, 32)
    router = qr.Router(32, 2, hidden=64)
    raw = qr.routing_probabilities(router, feats).max(1).values.mean()
    router.fit_feature_scale(feats)
    fitted = qr.routing_probabilities(router, feats).max(1).values.mean()
    assert raw > 0.95 and fitted < 0.75
    copy = qr.Router(32, 2, hidden=64)
    copy.load_state_dict(router.state_dict())
    torch.testing.assert_close(copy(feats), router(feats))
    with pytest.raises(ValueError, match="features"):
        router.fit_feature_scale(feats[:, :5])


# ----------------------------------------------------------------------------------------------
# Reruns keep their config; input records checked before any model
# ----------------------------------------------------------------------------------------------
def _given_paths(tmp_path, answer_of=lambda i: str(i + 1)):
    rows = [{"id": f"p{i}", "question": f"{i} + 1", "answer": answer_of(i), "style": "given",
             "response": f" {i} + 1 = {i + 1}. The final answer is {i + 1}."} for i in range(3)]
    return _write(tmp_path / "given.jsonl", rows)


def test_rerun_with_another_config_is_refused_unless_overwrite(world, tmp_path, monkeypatch):
    import dataclasses

    from distillkit import InputError
    from distillkit.methods.qr_distill import runner as qr_distill  # the module whose run() loads the students

    cfg = QRDistillConfig(paths_input=_given_paths(tmp_path), teachers=[], output_dir=str(tmp_path / "run"),
                          students=world["students"][1:], routing="random", router_encoder=None, max_steps=1,
                          batch_size=3, lr=1e-3, progress=False, device="cpu")
    run(cfg)
    summary = (tmp_path / "run" / "qr_summary.json").read_text()
    monkeypatch.setattr(qr_distill, "load_students", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(InputError, match=r"mutual: True -> False; max_steps: 1 -> 2"):
        run(dataclasses.replace(cfg, max_steps=2, mutual=False))
    assert (tmp_path / "run" / "qr_summary.json").read_text() == summary
    monkeypatch.undo()
    again = run(dataclasses.replace(cfg, max_steps=2, overwrite=True))
    assert again["config"]["max_steps"] == 2
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(aside) == 1 and (aside[0] / "qr_summary.json").read_text() == summary


def test_path_without_reference_answer_is_refused_naming_the_line(world, tmp_path):
    from distillkit import InputError

    paths = _given_paths(tmp_path, answer_of=lambda i: None if i == 2 else str(i + 1))
    cfg = QRDistillConfig(paths_input=paths, teachers=[], output_dir=str(tmp_path / "run"),
                          students=world["students"][1:], routing="random", router_encoder=None, max_steps=1,
                          progress=False, device="cpu")
    with pytest.raises(InputError, match=r"given\.jsonl:3 \(id 'p2'\): answer=None"):
        run(cfg)
    assert not os.path.exists(tmp_path / "run" / "paths.jsonl")
