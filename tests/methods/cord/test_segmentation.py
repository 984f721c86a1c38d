"""The three CoRD step segmentations: where steps end, streaming vs final, exact reassembly."""
from __future__ import annotations

import pytest

from distillkit.methods.cord.segmentation import (
    LEGACY_PREFIX_PHRASES,
    PAPER_PREFIX_PHRASES,
    LineBreak,
    PrefixBased,
    PromptGuided,
    make_segmentation,
)
from distillkit.teachers.base import StepBoundary, StringStop, as_boundary, finish

TRACE_PG = " 1: add 3 and 4.\n\n### Step 2: that is 7.\n\n### Step 3: done.</think> The final answer is 7."
TRACE_LB = "add 3 and 4.\n\n\nthat is 7.\n\nso done.</think> answer 7"
TRACE_PB = "I add 3 and 4. Wait, 3+4 is 7.\nLet me check: yes. Butter is not a step. so 7.</think>x"


def test_prompt_guided():
    seg = PromptGuided()
    assert isinstance(seg, StepBoundary)
    assert seg.prompt("Q: 3+4?") == "Q: 3+4?\n<think> ### Step"
    assert seg.split(TRACE_PG) == [" 1: add 3 and 4.\n\n", "### Step 2: that is 7.\n\n", "### Step 3: done.</think>"]
    # A step's own header is not a boundary; the next header is, even before it is complete text.
    assert seg.cut("### Step 2: x") is None
    assert seg.cut("### Step 2: x\n### Step") == (14, False)
    assert seg.cut("\n\n### Step 2: x\n### Step 3") == (16, False)
    assert seg.cut("### Step 2: x</think> The") == (21, True)
    assert seg.stop_strings() == ["\n### Step", "</think>"]


def test_line_break():
    seg = LineBreak()
    assert seg.split(TRACE_LB) == ["add 3 and 4.\n\n\n", "that is 7.\n\n", "so done.</think>"]
    assert seg.cut("\n\nleading blank lines are this step's") is None
    assert seg.cut("a\n\nb", final=True) == (3, False)
    assert seg.prompt("Q") == "Q\n<think>\n"


def test_prefix_based():
    seg = PrefixBased(LEGACY_PREFIX_PHRASES)  # the older list holds "but" and "so"
    steps = seg.split(TRACE_PB)
    assert steps == ["I add 3 and 4. ", "Wait, 3+4 is 7.\n", "Let me check: yes. Butter is not a step. ",
                     "so 7.</think>"]
    assert "".join(steps) == TRACE_PB[:TRACE_PB.index("</think>") + len("</think>")]
    # Streaming needs one more character to know "But" is a word and not "Butter".
    assert seg.cut("x. But") is None
    assert seg.cut("x. But", final=True) == (3, False)
    assert seg.cut("x. Butt") is None and seg.cut("x. Butt", final=True) is None
    assert seg.cut("x. But ") == (3, False)
    # Mid-sentence phrases are not boundaries; a phrase opening the step is its own.
    assert seg.cut("I think so but no", final=True) is None
    assert seg.cut("Wait, I was wrong. ok", final=True) is None
    custom = make_segmentation("prefix-based", phrases=["Verify"])
    assert custom.cut("a. verify it", final=True) == (3, False)
    assert custom.cut("a. Wait it", final=True) is None
    assert "\nVerify " in custom.stop_strings()


def test_make_segmentation_checks():
    assert isinstance(make_segmentation("line-break"), LineBreak)
    with pytest.raises(ValueError, match="segmentation"):
        make_segmentation("sentences")
    with pytest.raises(ValueError, match="phrases"):
        make_segmentation("line-break", phrases=["wait"])
    with pytest.raises(ValueError, match="phrases"):
        PrefixBased(phrases=[])


def test_finish_and_string_stops():
    seg = LineBreak()
    p = finish("a\n\nb c", seg, num_tokens=5, hit_eos=False)
    assert (p.text, p.num_tokens, p.finished, p.stop_reason) == ("a\n\n", 5, False, "boundary")
    p = finish("a</think>b", seg, num_tokens=3, hit_eos=False)
    assert (p.text, p.finished, p.stop_reason) == ("a</think>", True, "end")
    assert finish("abc", seg, num_tokens=3, hit_eos=True).stop_reason == "eos"
    assert finish("abc", seg, num_tokens=3, hit_eos=False).stop_reason == "length"
    stop = as_boundary(["\n", "."])
    assert isinstance(stop, StringStop) and stop.cut("ab.c\n") == (3, True)
    assert finish("7.\nmore", stop, num_tokens=4, hit_eos=False).text == "7."
    assert as_boundary(None).cut("anything") is None
    with pytest.raises(TypeError, match="stop"):
        as_boundary(3)


def test_prefix_based_default_is_the_papers_fifteen_phrases():
    assert len(PAPER_PREFIX_PHRASES) == 15 == len(set(PAPER_PREFIX_PHRASES))
    for phrase in ("going back to", "another way", "let's try a different approach", "using another method",
                   "we can also verify", "wait", "alternatively"):
        assert phrase in PAPER_PREFIX_PHRASES
    # ten of the paper's phrases were missing from the earlier list, which held five of them
    assert len(set(PAPER_PREFIX_PHRASES) - set(LEGACY_PREFIX_PHRASES)) == 10
    seg = make_segmentation("prefix-based")
    assert seg.phrases == list(PAPER_PREFIX_PHRASES)
    # the paper's phrases open steps, after a newline or a sentence end of any kind
    trace = ("x is 3. Going back to the start, y is 4? Another way: z.\nLet's try a different approach! "
             "Using another method, 7. We can also verify it.</think>")
    assert seg.split(trace) == ["x is 3. ", "Going back to the start, y is 4? ", "Another way: z.\n",
                                "Let's try a different approach! ", "Using another method, 7. ",
                                "We can also verify it.</think>"]
    # words the older list split on are no longer boundaries
    assert seg.cut("x. So 7. But then. Hmm, now.", final=True) is None


def test_prefix_stop_strings_cover_question_and_exclamation_marks():
    stops = make_segmentation("prefix-based").stop_strings()
    for head in ("\n", ". ", "? ", "! "):
        assert f"{head}Wait," in stops and f"{head}Going back to " in stops and f"{head}wait " in stops
    assert stops[-1] == "</think>"
    # each stop string, where a model's output would end, is a boundary ``cut`` agrees with
    seg = make_segmentation("prefix-based")
    for s in stops[:-1]:
        text = "a" + s + "b"
        found = seg.cut(text)
        assert found is not None and found[0] == len("a") + len(s) - len(s.lstrip("\n.?! ")), s


def test_user_prefix_list_from_the_config(tmp_path):
    from distillkit.methods.cord import CordConfig

    base = dict(teachers=["A"], meta_prover="M", input_path="i", output_path="o", segmentation="prefix-based")
    cfg = CordConfig(**base, segmentation_prefixes=["Check", "next up"])
    seg = cfg.make_segmentation()
    assert seg.cut("a. Check it", final=True) == (3, False) and seg.cut("a. Wait it", final=True) is None
    assert "? Next up " in seg.stop_strings()
    assert CordConfig(**base).make_segmentation().phrases == list(PAPER_PREFIX_PHRASES)
    old = CordConfig(**base, prefix_phrases=["Check"])  # the old field name, accepted for this release
    assert old.segmentation_prefixes == ["Check"]
    path = tmp_path / "c.yaml"
    path.write_text("teachers: [A]\nmeta_prover: M\ninput_path: i\noutput_path: o\nsegmentation: prefix-based\n"
                    "segmentation_prefixes: [Check, next up]\n")
    assert CordConfig.from_yaml(str(path)).make_segmentation().phrases == ["Check", "next up"]
    path.write_text(path.read_text().replace("segmentation_prefixes", "prefix_phrases"))
    assert CordConfig.from_yaml(str(path)).segmentation_prefixes == ["Check", "next up"]
    with pytest.raises(ValueError, match="segmentation_prefixes"):
        CordConfig(**{**base, "segmentation": "line-break"}, segmentation_prefixes=["Check"])
    with pytest.raises(ValueError, match="segmentation_prefixes"):
        CordConfig(**base, segmentation_prefixes=["ok", " "])
