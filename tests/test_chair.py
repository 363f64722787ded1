"""CHAIR on hand-made captions with known answers: synonyms, plurals, phrases, exact rates, shapes and COCO objects."""
import json

import pytest

import shapes
from chair import (caption_chair, chair_scores, coco_object_names, image_objects, object_mentions,
                   shapes_object_names)
from datasets import References
from metrics import results_table
from utils import ToolkitError

COCO = coco_object_names()


def mentions(sentence):
    return object_mentions(sentence.split(), COCO)


@pytest.mark.parametrize("sentence, classes", [
    ("two men riding bikes", ["person", "bicycle"]),
    ("a woman and her children with puppies", ["person", "person", "dog"]),
    ("policemen on motorbikes near buses", ["person", "motorcycle", "bus"]),
    ("a kitten on a sofa beside a television", ["cat", "couch", "tv"]),
    ("knives forks and wine glasses on tables", ["knife", "fork", "wine glass", "dining table"]),
    ("calves and geese and mice", ["cow", "bird", "mouse"]),
    ("a pair of skis and a ski", ["skis", "skis"]),
    ("a man with a dog", ["person", "dog"]),
])
def test_synonyms_and_plurals_name_the_coco_category(sentence, classes):
    assert mentions(sentence) == classes


@pytest.mark.parametrize("phrase", ["hot dog", "teddy bear", "traffic light", "fire hydrant", "stop sign",
                                    "parking meter", "baseball bat", "tennis racket", "wine glass", "cell phone",
                                    "dining table"])
def test_a_two_word_name_is_one_mention_of_its_category(phrase):
    assert mentions(f"a {phrase} in the street") == [phrase]
    assert mentions(f"two {phrase}s") == [phrase]


def test_a_hot_dog_is_no_dog():
    assert mentions("a hot dog on a plate") == ["hot dog"]
    assert mentions("a dog eating hot dogs") == ["dog", "hot dog"]
    scores, hallucinated = chair_scores([["a", "hot", "dog", "on", "a", "plate"]], [{"dog"}], COCO)
    assert hallucinated == [["hot dog"]] and scores["chair_i"] == 1 and scores["chair_s"] == 1


def test_the_papers_phrase_rules():
    assert mentions("a baby elephant and an adult giraffe") == ["elephant", "giraffe"]  # no person
    assert mentions("a passenger jet and a passenger train") == ["airplane", "train"]
    assert mentions("a toilet seat and a bow tie") == ["toilet", "tie"]
    assert mentions("a baby animal near home plate by the train tracks") == []
    assert mentions("a stove top oven") == ["oven"]


def test_an_absent_object_counts_in_both_rates_with_exact_fractions():
    captions = [["a", "man", "walking", "a", "dog"],   # person, dog: both there
                ["two", "cats", "on", "a", "couch"],   # cat there, couch absent: 1 of 2 hallucinated
                ["a", "hot", "dog", "and", "a", "pizza"],  # hot dog, pizza: both absent
                ["a", "view", "of", "the", "sky"]]     # no object named: no mention, no hallucination
    objects = [{"person", "dog"}, {"cat"}, {"dining table"}, set()]
    scores, hallucinated = chair_scores(captions, objects, COCO)
    assert hallucinated == [[], ["couch"], ["hot dog", "pizza"], []]
    assert scores["object_mentions"] == 6 and scores["captions"] == 4
    assert scores["chair_i"] == 3 / 6
    assert scores["chair_s"] == 2 / 4


def test_a_repeated_hallucination_counts_each_mention():
    scores, _ = chair_scores([["a", "cat", "and", "a", "cat", "and", "a", "dog"]], [{"dog"}], COCO)
    assert scores["chair_i"] == 2 / 3 and scores["chair_s"] == 1


def test_an_empty_caption_list_has_no_rates():
    scores, hallucinated = chair_scores([], [], COCO)
    assert scores == {"chair_i": None, "chair_s": None, "object_mentions": 0, "captions": 0}
    assert hallucinated == []
    assert caption_chair([], ([], COCO)) == ({}, [])


def test_captions_without_object_mentions_have_chair_s_but_no_chair_i():
    assert caption_chair([["a", "sunny", "day"]], ([{"person"}], COCO)) == ({"chair_s": 0.0}, [[]])


def test_misaligned_inputs_are_refused():
    with pytest.raises(ToolkitError, match="1 object lists for 2 captions"):
        chair_scores([["a"], ["b"]], [set()], COCO)


def shapes_references(indices, seed=0):
    """References of shapes scenes as load_references gives them from a REFS file."""
    scenes = [shapes.scene_at(seed, index)[0] for index in indices]
    return scenes, References([f"shapes_{index:06d}.jpg" for index in indices], [[["a"]]] * len(indices), False,
                              [shapes.object_records(scene) for scene in scenes])


def test_shapes_captions_against_shapes_objects():
    scenes, refs = shapes_references(range(30))
    objects, names = image_objects(refs)
    assert objects == [{obj.shape for obj in scene.objects} for scene in scenes]
    true = [shapes.canonical_caption(scene) for scene in scenes]
    assert chair_scores(true, objects, names)[0]["chair_i"] == 0
    # Each image described by the next image's caption: a shape the image lacks is hallucinated.
    shifted = true[1:] + true[:1]
    scores, hallucinated = chair_scores(shifted, objects, names)
    expected = [[obj.shape for obj in other.objects if obj.shape not in {o.shape for o in scene.objects}]
                for scene, other in zip(scenes, scenes[1:] + scenes[:1])]
    assert hallucinated == expected
    assert scores["chair_i"] == sum(map(len, expected)) / sum(len(scene.objects) for scene in scenes)
    assert scores["chair_s"] == sum(map(bool, expected)) / len(scenes)


def test_shapes_plurals_and_other_words():
    names = shapes_object_names()
    two_shapes = ["two", "red", "circles", "and", "a", "big", "blue", "square"]
    assert object_mentions(two_shapes, names) == ["circle", "square"]
    assert object_mentions(["a", "large", "green", "triangle", "on", "a", "grey", "background"], names) == ["triangle"]


def test_a_split_with_objects_for_some_images_only_is_refused():
    refs = shapes_references([0])[1]
    with pytest.raises(ToolkitError, match="image 'b.jpg' of the split lists no objects while others do"):
        image_objects(References(["a.jpg", "b.jpg"], [[["a"]]] * 2, False, [refs.objects[0], None]))


def test_data_without_object_lists_gives_none():
    assert image_objects(References(["a.jpg"], [[["a"]]], False, [None])) is None
    assert caption_chair([["a", "dog"]], None) == ({}, [None])


@pytest.fixture
def instances_json(tmp_path):
    """A COCO instances file: image 1 holds a person and a dog, image 2 a hot dog, image 3 nothing."""
    path = tmp_path / "instances_val2014.json"
    path.write_text(json.dumps({
        "images": [{"id": 1}, {"id": 2}, {"id": 3}],
        "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}, {"id": 58, "name": "hot dog"}],
        "annotations": [{"image_id": 1, "category_id": 1}, {"image_id": 1, "category_id": 18},
                        {"image_id": 1, "category_id": 1}, {"image_id": 2, "category_id": 58}]}))
    return str(path)


def coco_references(image_ids, fallback=False):
    return References(list(image_ids), [[["a"]]] * len(image_ids), fallback, [None] * len(image_ids))


def test_coco_objects_come_from_the_instance_annotations(instances_json):
    refs = coco_references([2, "COCO_val2014_000000000001.jpg", 3])  # cocoids, or the id in the file name
    objects, names = image_objects(refs, instances_json)
    assert objects == [{"hot dog"}, {"person", "dog"}, set()]
    scores, hallucinated = chair_scores([["a", "dog"], ["a", "boy", "and", "his", "dog"], ["a", "cat"]], objects,
                                        names)
    assert hallucinated == [["dog"], [], ["cat"]]
    assert scores["chair_i"] == 2 / 4 and scores["chair_s"] == 2 / 3


def test_bad_instances_are_refused_with_the_fix(instances_json, tmp_path):
    with pytest.raises(ToolkitError, match=r"1 of the split's 2 images \(COCO ids \[7\]\) are not in .*"
                                           r"instances_val2014.json for Karpathy's val and test"):
        image_objects(coco_references([1, 7]), instances_json)
    with pytest.raises(ToolkitError, match="missing.json' does not exist; download annotations_trainval2014.zip"):
        image_objects(coco_references([1]), str(tmp_path / "missing.json"))
    not_instances = tmp_path / "captions.json"
    not_instances.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(ToolkitError, match="not a COCO instances file: it needs lists"):
        image_objects(coco_references([1]), str(not_instances))
    with pytest.raises(ToolkitError, match="needs the split's REFS file"):
        image_objects(coco_references([0], fallback=True), instances_json)
    with pytest.raises(ToolkitError, match="lists its own objects \\(shapes\\): drop --instances"):
        image_objects(shapes_references([0])[1], instances_json)
    with pytest.raises(ToolkitError, match="'photo.jpg' has no cocoid and no COCO id in its file name"):
        image_objects(coco_references(["photo.jpg"]), instances_json)



@pytest.mark.parametrize("change, message", [
    (lambda data: data["categories"].append({"id": 99, "name": "unicorn"}), r"categories \['unicorn'\] that are none"),
    (lambda data: data["annotations"].append({"image_id": 9, "category_id": 1}), "annotation of image 9, category 1"),
    (lambda data: data["images"].append({"file_name": "x.jpg"}), "lacks its key 'id'"),
])
def test_a_foreign_instances_file_is_refused(instances_json, change, message):
    with open(instances_json, encoding="utf-8") as file:
        data = json.load(file)
    change(data)
    with open(instances_json, "w", encoding="utf-8") as file:
        json.dump(data, file)
    with pytest.raises(ToolkitError, match=message):
        image_objects(coco_references([1]), instances_json)


def test_the_results_table_shows_chair_after_cider():
    results = {"attention": {"bleu4": 0.5, "cider": 4.0, "chair_i": 0.125, "chair_s": 0.25, "mass_in_box": 0.1},
               "blind": {"bleu4": 0.25, "cider": 1.0, "chair_i": 0.5, "chair_s": 0.75}}
    assert results_table(results) == (
        "| run | BLEU-4 | CIDEr | CHAIR-i | CHAIR-s | attention mass in box |\n"
        "| --- | --- | --- | --- | --- | --- |\n"
        "| attention | 0.5000 | 4.0000 | 0.1250 | 0.2500 | 0.1000 |\n"
        "| blind | 0.2500 | 1.0000 | 0.5000 | 0.7500 | — |")
