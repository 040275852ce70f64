"""ILSVRC2012 classes: labels are indices into the sorted wnid list, never into names."""

from __future__ import annotations

import pytest

from imagenet_ray.data.classes import ClassList, imagenet_classes, parse_synset_mapping
from imagenet_ray.errors import UserError


def test_imagenet_classes_are_1000_sorted_unique_wnids():
    classes = imagenet_classes()
    assert len(classes) == 1000
    assert list(classes.wnids) == sorted(classes.wnids)
    assert len(set(classes.wnids)) == 1000
    assert all(len(w) == 9 and w.startswith("n") and w[1:].isdigit() for w in classes.wnids)
    assert all(classes.names)


def test_first_and_last_class():
    classes = imagenet_classes()
    assert classes.wnids[0] == "n01440764"
    assert classes.names[0].split(",")[0] == "tench"
    assert classes.label_of("n01440764") == 0
    assert classes.wnids[999] == "n15075141"
    assert classes.label_of("n15075141") == 999
    assert "toilet tissue" in classes.names[999]


@pytest.mark.parametrize("a, b, name", [("n02012849", "n03126707", "crane"), ("n03710637", "n03710721", "maillot")])
def test_duplicate_names_have_distinct_labels(a, b, name):
    classes = imagenet_classes()
    la, lb = classes.label_of(a), classes.label_of(b)
    assert la != lb
    assert la < lb  # sorted-wnid order
    assert classes.names[la].split(",")[0] == name
    assert classes.names[lb].split(",")[0] == name
    assert classes.wnids[la] == a and classes.wnids[lb] == b


def test_crane_and_maillot_exact_labels():
    # Index in the sorted list of the official 1000 wnids (the torchvision / Kaggle convention).
    classes = imagenet_classes()
    assert classes.label_of("n02012849") == 134
    assert classes.label_of("n03126707") == 517
    assert classes.label_of("n03710637") == 638
    assert classes.label_of("n03710721") == 639


def test_parse_synset_mapping_sorts_unsorted_input():
    text = "n03126707 crane\nn01440764 tench, Tinca tinca\n\nn02012849 crane\n"
    classes = parse_synset_mapping(text)
    assert classes.wnids == ("n01440764", "n02012849", "n03126707")
    assert classes.names == ("tench, Tinca tinca", "crane", "crane")
    assert classes.label_of("n03126707") == 2


def test_parse_synset_mapping_rejects_duplicates():
    with pytest.raises(UserError) as info:
        parse_synset_mapping("n01440764 tench\nn01443537 goldfish\nn01440764 tench again\n", "map.txt")
    assert "n01440764" in str(info.value) and "map.txt:3" in str(info.value)


@pytest.mark.parametrize("line", ["x01440764 tench", "n0144076 short", "n014407645 long", "tench n01440764"])
def test_parse_synset_mapping_rejects_non_wnids(line):
    with pytest.raises(UserError) as info:
        parse_synset_mapping(f"n01443537 goldfish\n{line}\n", "map.txt")
    assert "map.txt:2" in str(info.value) and "not a wnid" in str(info.value)


def test_parse_synset_mapping_rejects_empty():
    with pytest.raises(UserError, match="no classes"):
        parse_synset_mapping("\n\n")


def test_subset_keeps_sorted_order_and_names():
    classes = imagenet_classes()
    sub = classes.subset(["n03126707", "n01440764", "n02012849", "n01440764"])
    assert sub.wnids == ("n01440764", "n02012849", "n03126707")
    assert sub.names == (classes.names[0], classes.names[134], classes.names[517])
    assert sub.label_of("n03126707") == 2


def test_subset_of_unknown_wnid_raises():
    with pytest.raises(UserError, match="n99999999"):
        imagenet_classes().subset(["n01440764", "n99999999"])


def test_label_of_unknown_wnid_names_it():
    with pytest.raises(UserError) as info:
        imagenet_classes().label_of("n00000001")
    assert "n00000001" in str(info.value)


def test_class_list_validates_order_and_lengths():
    with pytest.raises(UserError):
        ClassList(("n02", "n01"), ("b", "a"))
    with pytest.raises(UserError):
        ClassList(("n01", "n01"), ("a", "a"))
    with pytest.raises(UserError):
        ClassList(("n01", "n02"), ("a",))


def test_to_synset_mapping_round_trips():
    classes = imagenet_classes()
    assert parse_synset_mapping(classes.to_synset_mapping()) == classes
