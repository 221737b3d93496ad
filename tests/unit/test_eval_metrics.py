import pytest

from vlmscale.eval.metrics import exact_match, iou, parse_box, pope_scores, yes_no


@pytest.mark.parametrize("text,expected", [
    ("<box>[100, 200, 300, 400]</box>", (0.1, 0.2, 0.3, 0.4)),  # InternVL 0-999 grid
    ("<box>[0.1, 0.2, 0.3, 0.4]</box>", (0.1, 0.2, 0.3, 0.4)),  # normalised floats
    ("It is here: <box>[0, 0, 999, 999]</box>.", (0.0, 0.0, 0.999, 0.999)),
    ("<box>100, 200, 300, 400</box>", (0.1, 0.2, 0.3, 0.4)),  # brackets optional
    ("<box>[1, 1, 1, 1]</box>", None),  # empty box
    ("<box>[300, 200, 100, 400]</box>", None),  # x2 < x1
    ("<box>[100, 200, 300]</box>", None),
    ("<box>[1200, 0, 1300, 10]</box>", None),  # out of range
    ("no box here", None),
    ("<box>[a, b, c, d]</box>", None),
])
def test_parse_box(text, expected):
    got = parse_box(text)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected)


def test_iou_hand_computed():
    assert iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)
    assert iou((0, 0, 1, 1), (0, 0, 1, 1)) == 1.0
    assert iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0


def test_pope_hand_computed():
    # gold: 4 yes, 4 no. predictions: 3 TP, 1 FN, 2 FP, 1 TN, 1 unparsable on a 'no' (counts as not-yes)
    pairs = [("yes", "yes")] * 3 + [("no", "yes")] + [("yes", "no")] * 2 + [("no", "no")] + [(None, "no")]
    s = pope_scores(pairs)
    assert s["accuracy"] == pytest.approx(5 / 8)  # TP 3 + TN 2
    assert s["precision"] == pytest.approx(3 / 5)
    assert s["recall"] == pytest.approx(3 / 4)
    assert s["f1"] == pytest.approx(2 * 0.6 * 0.75 / 1.35)
    assert s["yes_ratio"] == pytest.approx(5 / 8)
    assert s["unparsed"] == 1


def test_answer_normalisation():
    assert exact_match(" Red.", "red")
    assert not exact_match("reddish", "red")
    assert yes_no("Yes, there is.") == "yes" and yes_no("maybe") is None
