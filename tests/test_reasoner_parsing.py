"""The reasoner's prompt facts (templates, resize, coordinate mapping) against the public VisionReasoner / Seg-Zero
code, and the answer parser on real-format outputs: well-formed, several objects, empty, truncated, malformed,
text outside the tags, coordinates outside the frame. No model is loaded here."""

from __future__ import annotations

import math

import pytest

from lisa_agent.reasoner.parsing import STATUSES, parse_output
from lisa_agent.reasoner.templates import (
    RESIZE,
    SEG_ZERO_TEMPLATE,
    STYLES,
    VISION_REASONER_TEMPLATE,
    scale_factors,
    style_for,
    to_model,
)

# The public strings, as dvlab-research/VisionReasoner vision_reasoner/models/vision_reasoner_model.py
# (DETECTION_TEMPLATE) and dvlab-research/Seg-Zero evaluation_scripts/evaluation.py (QUESTION_TEMPLATE) build
# them by implicit concatenation, written out here as single literals.
PUBLIC_VR = ('Please find "{Question}" with bboxs and points.Compare the difference between object(s) and find the '
             'most closely matched object(s).Output the thinking process in <think> </think> and final answer in '
             '<answer> </answer> tags.Output the bbox(es) and point(s) inside the interested object(s) in JSON '
             'format.i.e., <think> thinking process here </think><answer>{Answer}</answer>')
PUBLIC_VR_ANSWER = ('[{"bbox_2d": [10,100,200,210], "point_2d": [30,110]}, '
                    '{"bbox_2d": [225,296,706,786], "point_2d": [302,410]}]')
PUBLIC_SZ = ("Please find '{Question}' with bbox and points.Compare the difference between objects and find the most "
             "closely matched one.Output the thinking process in <think> </think> and final answer in <answer> "
             "</answer> tags.Output the one bbox and points of two largest inscribed circles inside the interested "
             "object in JSON format.i.e., <think> thinking process here </think><answer>{Answer}</answer>")
PUBLIC_SZ_ANSWER = "{'bbox': [10,100,200,210], 'points_1': [30,110], 'points_2': [35,180]}"

GOOD = ('<think> The user wants to cut something; the knife has a blade. </think>\n'
        '<answer>[{"bbox_2d": [10,100,200,210], "point_2d": [30,110]}]</answer>')
TWO = ('<think>Two mugs could hold coffee.</think><answer>[{"bbox_2d": [10,100,200,210], "point_2d": [30,110]}, '
       '{"bbox_2d": [225,296,706,786], "point_2d": [302,410]}]</answer>')
EMPTY = "<think>There is no hammer on the table.</think><answer>[]</answer>"
TRUNCATED = ('<think>cut</think><answer>[{"bbox_2d": [10,100,200,210], "point_2d": [30,110]}, '
             '{"bbox_2d": [225,296,7')
SEG_ZERO = '<think>the bottle</think><answer>{"bbox": [10,100,200,210], "points_1": [30,110], "points_2": [35,180]}</answer>'


def test_templates_are_the_public_ones_byte_for_byte():
    assert VISION_REASONER_TEMPLATE == PUBLIC_VR
    assert SEG_ZERO_TEMPLATE == PUBLIC_SZ
    vr, sz = STYLES["vision_reasoner"], STYLES["seg_zero"]
    assert vr.example == PUBLIC_VR_ANSWER and sz.example == PUBLIC_SZ_ANSWER
    query = "What can I have if I'm thirsty?"
    assert vr.instruction(query) == PUBLIC_VR.format(Question=query.lower().strip(".\"?!"), Answer=PUBLIC_VR_ANSWER)
    assert 'Please find "what can i have if i\'m thirsty" with bboxs' in vr.instruction(query)
    assert sz.instruction("The unusual object.") == PUBLIC_SZ.format(Question="the unusual object",
                                                                     Answer=PUBLIC_SZ_ANSWER)
    # the decoding budgets and the fixed square of the public code
    assert (vr.max_new_tokens, sz.max_new_tokens, RESIZE) == (2048, 1024, 840)
    assert RESIZE % 28 == 0  # Qwen2.5-VL keeps it as it is (14-px patches merged 2 x 2)


def test_style_is_declared_or_guessed_from_the_name():
    assert style_for(None, "Ricky06662/VisionReasoner-7B").name == "vision_reasoner"
    assert style_for(None, "Ricky06662/Seg-Zero-7B").name == "seg_zero"
    assert style_for("seg_zero", "anything").name == "seg_zero"
    with pytest.raises(KeyError):
        style_for("llava_v1")


def test_public_rounding_differs_between_the_two_styles():
    # 420 px wide: factor 0.5. VisionReasoner int(5 * 0.5 + 0.5) = 3; Seg-Zero round(int(5) * 0.5) = round(2.5) = 2
    vr = parse_output('<answer>[{"bbox_2d": [5,5,7,7], "point_2d": [5,5]}]</answer>', 420, 420)
    sz = parse_output('<answer>{"bbox": [5,5,7,7], "points_1": [5,5], "points_2": [7,7]}</answer>', 420, 420,
                      style="seg_zero")
    assert vr.objects[0].box == (3, 3, 4, 4) and vr.objects[0].points == ((3, 3),)
    assert sz.objects[0].box == (2, 2, 4, 4) and sz.objects[0].points == ((2, 2), (4, 4))
    # Seg-Zero truncates the model's number first: 5.9 -> 5
    sz = parse_output('{"bbox": [5.9,5,7,7], "points_1": [5,5], "points_2": [7,7]}', 420, 420, style="seg_zero")
    assert sz.objects[0].box[0] == 2


@pytest.mark.parametrize("height, width", [(480, 640), (240, 1280), (1080, 720), (97, 333)])
def test_coordinates_round_trip_on_non_square_frames(height, width):
    fx, fy = scale_factors(height, width)
    assert (fx, fy) == (width / 840, height / 840)
    box = (0.13 * width, 0.41 * height, 0.77 * width, 0.93 * height)
    point = (0.5 * width, 0.6 * height)
    # what the model would write: integers in the 840 x 840 square
    m1, m2 = to_model(box[0], box[1], height, width), to_model(box[2], box[3], height, width)
    mp = to_model(*point, height, width)
    text = (f'<answer>[{{"bbox_2d": [{round(m1[0])},{round(m1[1])},{round(m2[0])},{round(m2[1])}], '
            f'"point_2d": [{round(mp[0])},{round(mp[1])}]}}]</answer>')
    for strict in (False, True):
        parsed = parse_output(text, height, width, strict=strict)
        assert parsed.status == "ok"
        (obj,) = parsed.objects
        tol = (math.ceil(fx / 2) + 1, math.ceil(fy / 2) + 1)  # the model's integer grid, then the rounding
        for got, want, t in zip(obj.box, box, (tol[0], tol[1], tol[0], tol[1]), strict=True):
            assert abs(got - want) <= t
        assert abs(obj.points[0][0] - point[0]) <= tol[0] and abs(obj.points[0][1] - point[1]) <= tol[1]


def test_well_formed_one_and_several_objects():
    one = parse_output(GOOD, 480, 640)
    assert one.status == "ok" and one.found and len(one.objects) == 1
    assert one.think == "The user wants to cut something; the knife has a blade."
    assert one.text.startswith("<answer>") and "<think>" not in one.text
    # 640 / 840 and 480 / 840, int(v * f + 0.5)
    assert one.objects[0].box == (8, 57, 152, 120) and one.objects[0].points == ((23, 63),)
    assert one.objects[0].to_dict() == {"box": [8, 57, 152, 120], "points": [[23, 63]]}
    two = parse_output(TWO, 480, 640)
    assert [o.box for o in two.objects] == [(8, 57, 152, 120), (171, 169, 538, 449)]
    assert parse_output(TWO, 480, 640, strict=True).objects == two.objects


def test_empty_list_is_a_typed_no_target():
    for strict in (False, True):
        parsed = parse_output(EMPTY, 480, 640, strict=strict)
        assert parsed.status == "empty" and not parsed.found
        assert parsed.think == "There is no hammer on the table."


def test_truncated_answer_keeps_the_complete_objects_unless_strict():
    tolerant = parse_output(TRUNCATED, 480, 640)
    assert tolerant.status == "partial" and len(tolerant.objects) == 1
    assert any("not closed" in n for n in tolerant.notes)
    strict = parse_output(TRUNCATED, 480, 640, strict=True)
    assert strict.status == "malformed" and not strict.found  # the public code reads nothing


@pytest.mark.parametrize("output, status, n", [
    ("", "no_answer", 0),
    ("I think it is the knife.", "no_answer", 0),
    ("<think>hmm</think><answer>the knife</answer>", "malformed", 0),
    ("<think>hmm</think><answer>{}</answer>", "malformed", 0),
    ("<answer>[1, 2, 3]</answer>", "malformed", 0),
    ('<answer>[{"point_2d": [1, 2]}]</answer>', "malformed", 0),
    ('<answer>[{"bbox_2d": [1, 2, 3]}]</answer>', "malformed", 0),
    ('<answer>[{"bbox_2d": [NaN, 2, 3, 4]}]</answer>', "malformed", 0),
    ('<answer>[{"bbox_2d": [10,10,50,50], "point_2d": [20,20]}, {"bbox_2d": "x"}]</answer>', "partial", 1),
    ('Sure. <answer> [{"bbox_2d": [10,10,50,50], "point_2d": [20,20]}] </answer> Done.', "ok", 1),
    ('<think>a</think>[{"bbox_2d": [10,10,50,50], "point_2d": [20,20]}]', "ok", 1),  # no <answer> tag
    ("<answer>[{'bbox_2d': [10,10,50,50], 'point_2d': [20,20]}]</answer>", "ok", 1),  # Python literal
    ('<answer>[{"bbox_2d": [10,10,50,50], "point_2d": [20,20]},, {"bbox_2d": [60,60,90,90]}]</answer>', "partial", 2),
    ('<answer>[{"bbox_2d": ["10","10","50","50"], "point_2d": [20,20]}]</answer>', "ok", 1),
    ('<answer>[{"bbox_2d": [10,10,50,50], "point_2d": [20,20]}]</answer><|im_end|>garbage{', "ok", 1),
    ("<think>unclosed thinking ... <answer>[]</answer>", "empty", 0),
])
def test_real_looking_outputs_never_crash(output, status, n):
    assert status in STATUSES
    parsed = parse_output(output, 480, 640)
    assert (parsed.status, len(parsed.objects)) == (status, n), parsed
    for strict in (True,):
        assert parse_output(output, 480, 640, strict=strict).status in STATUSES


def test_coordinates_outside_the_frame_are_clipped_and_boxes_ordered():
    out = '<answer>[{"bbox_2d": [900,-30,-20,500], "point_2d": [1000,-5]}]</answer>'
    for strict in (False, True):
        (obj,) = parse_output(out, 480, 640, strict=strict).objects
        assert obj.box == (0, 0, 639, 286) and obj.points == ((639, 0),) and obj.clipped
        assert obj.model_box == (900.0, -30.0, -20.0, 500.0)
    tolerant = parse_output(out, 480, 640)
    assert tolerant.status == "ok" and any("clipped" in n for n in tolerant.notes)


def test_a_box_wholly_outside_the_frame_is_dropped():
    out = ('<answer>[{"bbox_2d": [850,10,900,50], "point_2d": [860,20]}, '
           '{"bbox_2d": [10,10,50,50], "point_2d": [20,20]}]</answer>')
    parsed = parse_output(out, 480, 640)
    assert parsed.status == "partial" and len(parsed.objects) == 1 and parsed.objects[0].box[0] < 100


def test_seg_zero_answers_strict_and_tolerant():
    strict = parse_output(SEG_ZERO, 480, 640, style="seg_zero", strict=True)
    assert strict.status == "ok" and strict.objects[0].points == ((23, 63), (27, 103))
    # the published example uses single quotes: json.loads (the public code) fails, the tolerant parser reads it
    single = SEG_ZERO.replace('"', "'")
    assert not parse_output(single, 480, 640, style="seg_zero", strict=True).found
    assert parse_output(single, 480, 640, style="seg_zero").objects == strict.objects
    # a VisionReasoner list read with Seg-Zero's style keeps at most two points per object
    assert parse_output(TWO, 480, 640, style="seg_zero").status == "ok"


def test_the_package_exports_the_reasoner_lazily():
    import subprocess
    import sys

    code = ("import sys, lisa_agent, lisa_agent.reasoner, lisa_agent.reasoner.templates, lisa_agent.reasoner.parsing; "
            "print(','.join(m for m in ('torch', 'transformers') if m in sys.modules)); "
            "from lisa_agent import ReasonerSegmenter; print(ReasonerSegmenter.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["lisa_agent.reasoner.segmenter"]  # nothing heavy before the class is asked for
