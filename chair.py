"""CHAIR, the object hallucination rate of captions (Rohrbach et al., EMNLP 2018, "Object Hallucination in
Image Captioning"), on data that lists each image's objects.

    objects = image_objects(references, instances_path)   # None where the data lists no objects
    scores, hallucinated = caption_chair(captions, objects)

An *object mention* is a word or phrase of a caption that names an object class; it is *hallucinated* when
its class is not among the image's objects. Over a split:
  - CHAIR-i (chair_i) = hallucinated mentions / all object mentions (a class named twice counts twice);
  - CHAIR-s (chair_s) = captions with at least one hallucinated mention / all captions.
Lower is better; 0 means no caption names anything the image lacks.

Words name classes through a synonym list. COCO: the paper's synonyms.txt (LisaAnne/Hallucination,
data/synonyms.txt: each line one of COCO's 80 categories, then its synonyms), plus the phrase rules of the
paper's code: two- and three-word names are read as one ("hot dog" is a hot dog, not a dog; "teddy bear",
"dining table"), "baby"/"adult" before an animal word names the animal, not a person, "passenger jet" and
"passenger train" a jet and a train, "toilet seat" a toilet, and "home plate" and "train track" nothing.
The objects of a COCO image are the categories of its instance annotations (--instances). Shapes: the
classes are the shapes' own names (circle, square, triangle); an image's objects are the shape words of
its object records (shapes.object_records, carried by the REFS file).

Plurals: a word not in the list counts as the first of these forms that is: -men -> -man (men, women,
policemen), mice -> mouse, geese -> goose, -ies -> -y, -ves -> -f or -fe, -es -> -, -s -> -. The paper
singularises with pattern.en's singularize; these rules give the same class for the regular plurals of every
name in the list. Left out: the paper's rule that drops "seat" from a caption that also names a toilet, and the
objects it adds to an image from the image's reference captions (here only the instance annotations count).
"""
import dataclasses
import functools
import json
import re

from utils import ToolkitError

# LisaAnne/Hallucination's data/synonyms.txt: the category first, then its synonyms (lowercased, repeats dropped;
# misspellings such as "televison" and "knive" are the file's own).
COCO_SYNONYMS = """\
person, girl, boy, man, woman, kid, child, chef, baker, people, adult, rider, children, baby, worker, passenger, \
sister, biker, policeman, cop, officer, lady, cowboy, bride, groom, male, female, guy, traveler, mother, father, \
gentleman, pitcher, player, skier, snowboarder, skater, skateboarder, foreigner, caller, offender, coworker, \
trespasser, patient, politician, soldier, grandchild, serviceman, walker, drinker, doctor, bicyclist, thief, buyer, \
teenager, student, camper, driver, solider, hunter, shopper, villager
bicycle, bike, unicycle, minibike, trike
car, automobile, van, minivan, sedan, suv, hatchback, cab, jeep, coupe, taxicab, limo, taxi
motorcycle, scooter, motor bike, motor cycle, motorbike, moped
airplane, jetliner, plane, air plane, monoplane, aircraft, jet, airbus, biplane, seaplane
bus, minibus, trolley
train, locomotive, tramway, caboose
truck, pickup, lorry, hauler, firetruck
boat, ship, liner, sailboat, motorboat, dinghy, powerboat, speedboat, canoe, skiff, yacht, kayak, catamaran, \
pontoon, houseboat, vessel, rowboat, trawler, ferryboat, watercraft, tugboat, schooner, barge, ferry, sailboard, \
paddleboat, lifeboat, freighter, steamboat, riverboat, battleship, steamship
traffic light, street light, traffic signal, stop light, streetlight, stoplight
fire hydrant, hydrant
stop sign
parking meter
bench, pew
bird, ostrich, owl, seagull, goose, duck, parakeet, falcon, robin, pelican, waterfowl, heron, hummingbird, mallard, \
finch, pigeon, sparrow, seabird, osprey, blackbird, fowl, shorebird, woodpecker, egret, chickadee, quail, bluebird, \
kingfisher, buzzard, willet, gull, swan, bluejay, flamingo, cormorant, parrot, loon, gosling, waterbird, pheasant, \
rooster, sandpiper, crow, raven, turkey, oriole, cowbird, warbler, magpie, peacock, cockatiel, lorikeet, puffin, \
vulture, condor, macaw, peafowl, cockatoo, songbird
cat, kitten, feline, tabby
dog, puppy, beagle, pup, chihuahua, schnauzer, dachshund, rottweiler, canine, pitbull, collie, pug, terrier, poodle, \
labrador, doggie, doberman, mutt, doggy, spaniel, bulldog, sheepdog, weimaraner, corgi, cocker, greyhound, \
retriever, brindle, hound, whippet, husky
horse, colt, pony, racehorse, stallion, equine, mare, foal, palomino, mustang, clydesdale, bronc, bronco
sheep, lamb, ram, goat, ewe
cow, cattle, oxen, ox, calf, holstein, heifer, buffalo, bull, zebu, bison
elephant
bear, panda
zebra
giraffe
backpack, knapsack
umbrella
handbag, wallet, purse, briefcase
tie, bow, bow tie
suitcase, suit case, luggage
frisbee
skis, ski
snowboard
sports ball, ball
kite
baseball bat
baseball glove
skateboard
surfboard, longboard, skimboard, shortboard, wakeboard
tennis racket, racket
bottle
wine glass
cup
fork
knife, pocketknife, knive
spoon
bowl, container
banana
apple
sandwich, burger, sub, cheeseburger, hamburger
orange
broccoli
carrot
hot dog
pizza
donut, doughnut, bagel
cake, cheesecake, cupcake, shortcake, coffeecake, pancake
chair, seat, stool
couch, sofa, recliner, futon, loveseat, settee, chesterfield
potted plant, houseplant
bed
dining table, table, desk
toilet, urinal, commode, lavatory, potty
tv, monitor, televison, television
laptop, computer, notebook, netbook, lenovo, macbook, laptop computer
mouse
remote
keyboard
cell phone, mobile phone, phone, cellphone, telephone, phon, smartphone, iphone
microwave
oven, stovetop, stove, stove top oven
toaster
sink
refrigerator, fridge, freezer
book
clock
vase
scissors
teddy bear, teddybear
hair drier, hairdryer
toothbrush
"""
# The paper's code: "baby"/"adult" before these words names the animal (not a person); "animal" and "cub"
# are no category, so "baby animal" names nothing.
COCO_ANIMAL_WORDS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal",
                     "cub")
COCO_PASSENGER_VEHICLES = ("jet", "train")  # "passenger jet" is a jet, not a person
COCO_OTHER_PHRASES = {"toilet seat": "toilet", "home plate": None, "train track": None}
SHAPE_WORD = -1  # position of the shape in a shapes object record's words: [size, colour, shape]
IRREGULAR_PLURALS = {"mice": "mouse", "geese": "goose"}
PLURAL_ENDINGS = (("men", "man"), ("ies", "y"), ("ves", "f"), ("ves", "fe"), ("es", ""), ("s", ""))
NO_OBJECT_LISTS = ("the split lists no objects per image: shapes data lists them; for COCO pass --instances with "
                   "COCO's instances_val2014.json (annotations_trainval2014.zip)")


@dataclasses.dataclass(frozen=True)
class ObjectNames:
    """The names of the object classes: phrase (tuple of words) -> class, or None for a phrase that names no
    object although one of its words does ("home plate")."""
    phrases: dict
    longest: int  # words in the longest phrase
    words: frozenset  # every word of every phrase: the forms plurals are turned into


def object_names(phrases):
    """ObjectNames from {"phrase of one or more words": class or None}."""
    split = {tuple(phrase.split()): name for phrase, name in phrases.items()}
    return ObjectNames(split, max(map(len, split)), frozenset(word for phrase in split for word in phrase))


def parse_synonyms(text):
    """{name: category} of a synonyms.txt: each line a category, then its synonyms, separated by commas."""
    synonyms = {}
    for line in text.splitlines():
        names = [" ".join(name.split()) for name in line.lower().split(",") if name.strip()]
        synonyms.update((name, names[0]) for name in names)
    return synonyms


@functools.cache
def coco_object_names():
    """The names of COCO's 80 categories: the paper's synonyms and phrase rules."""
    synonyms = parse_synonyms(COCO_SYNONYMS)
    rules = {f"{age} {animal}": synonyms.get(animal) for age in ("baby", "adult") for animal in COCO_ANIMAL_WORDS}
    rules |= {f"passenger {vehicle}": synonyms[vehicle] for vehicle in COCO_PASSENGER_VEHICLES}
    return object_names({**synonyms, **rules, **COCO_OTHER_PHRASES})


def shapes_object_names():
    """The names of the shapes data's classes: its shapes."""
    import shapes  # only shapes data needs it (it imports nltk, half a second)
    return object_names({shape: shape for shape in shapes.SHAPES})


def singular(word, known):
    """`word` if it is in `known`, else the first of its singular forms (module docstring) that is, else `word`."""
    if word in known:
        return word
    forms = [IRREGULAR_PLURALS.get(word)]
    forms += [word[:-len(ending)] + replacement for ending, replacement in PLURAL_ENDINGS if word.endswith(ending)]
    return next((form for form in forms if form in known), word)


def object_mentions(words, names):
    """The classes a caption's words name, one per mention, in order; at each word the longest phrase wins."""
    words = [singular(word.lower(), names.words) for word in words]
    mentions, start = [], 0
    while start < len(words):
        length = next((n for n in range(min(names.longest, len(words) - start), 0, -1)
                       if tuple(words[start:start + n]) in names.phrases), 1)
        name = names.phrases.get(tuple(words[start:start + length]))
        if name is not None:
            mentions.append(name)
        start += length
    return mentions


def chair_scores(captions, objects, names):
    """CHAIR of captions (per image its words) against objects (per image the set of classes it holds).

    Returns ({"chair_i", "chair_s": None when there is nothing to divide by, "object_mentions", "captions"},
    per image its hallucinated mentions, a list of classes in caption order).
    """
    if len(captions) != len(objects):
        raise ToolkitError(f"CHAIR: {len(objects)} object lists for {len(captions)} captions; pass one per image")
    mentions = [object_mentions(words, names) for words in captions]
    hallucinated = [[name for name in named if name not in present] for named, present in zip(mentions, objects)]
    total = sum(map(len, mentions))
    scores = {"chair_i": _share(sum(map(len, hallucinated)), total),
              "chair_s": _share(sum(map(bool, hallucinated)), len(captions)),
              "object_mentions": total, "captions": len(captions)}
    return scores, hallucinated


def _share(count, total):
    return count / total if total else None


def caption_chair(captions, object_lists):
    """What solver.test reports: ({"chair_i", "chair_s"} where defined, per image its hallucinated mentions),
    or ({}, [None] per image) when object_lists (image_objects' result) is None."""
    if object_lists is None:
        return {}, [None] * len(captions)
    scores, hallucinated = chair_scores(captions, *object_lists)
    return {key: scores[key] for key in ("chair_i", "chair_s") if scores[key] is not None}, hallucinated


# ---------------------------------------------------------------- each image's objects

def image_objects(references, instances_path=None):
    """(per image of the split the set of classes it holds, ObjectNames), or None when the data lists no objects.

    references: datasets.load_references' result. With instances_path (COCO's instances_*.json) the objects are
    the categories of each image's instance annotations; else those of the REFS file's object records (shapes).
    """
    if instances_path is not None:
        return coco_objects(references, instances_path), coco_object_names()
    if all(records is None for records in references.objects):
        return None
    if any(records is None for records in references.objects):
        missing = next(image for image, records in zip(references.image_ids, references.objects) if records is None)
        raise ToolkitError(f"image {missing!r} of the split lists no objects while others do; CHAIR needs the "
                           f"objects of every image: give each image of the split file an 'objects' list")
    shapes_in_images = [{record["words"][SHAPE_WORD] for record in records} for records in references.objects]
    return shapes_in_images, shapes_object_names()


def coco_objects(references, instances_path):
    """Per image of the split, the categories of its instance annotations in COCO's instances_*.json."""
    if references.fallback:
        raise ToolkitError("--instances needs the split's REFS file, which holds each image's COCO id; recreate the "
                           "data files with create_input_files.py (this folder was made without it)")
    if any(records is not None for records in references.objects):
        raise ToolkitError(f"--instances {instances_path!r} is for COCO data; this data lists its own objects "
                           f"(shapes): drop --instances")
    objects = instance_objects(read_instances(instances_path), instances_path)
    ids = [coco_image_id(image_id) for image_id in references.image_ids]
    missing = [image_id for image_id in ids if image_id not in objects]
    if missing:
        raise ToolkitError(f"{len(missing)} of the split's {len(ids)} images (COCO ids {missing[:3]}) are not in "
                           f"{instances_path!r}; pass the instances file of the COCO split they come from "
                           f"(instances_val2014.json for Karpathy's val and test)")
    return [objects[image_id] for image_id in ids]


def read_instances(path):
    """The JSON of COCO's instances_*.json, checked to hold lists of images, annotations and categories."""
    fix = ("download annotations_trainval2014.zip from https://cocodataset.org/#download and pass its "
           "annotations/instances_val2014.json")
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
    except FileNotFoundError:
        raise ToolkitError(f"COCO instances file {path!r} does not exist; {fix}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ToolkitError(f"cannot read COCO instances file {path!r} ({error}); {fix}") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(key), list)
                                             for key in ("images", "annotations", "categories")):
        raise ToolkitError(f"{path!r} is not a COCO instances file: it needs lists 'images', 'annotations' and "
                           f"'categories'; {fix}")
    return data


def instance_objects(data, path):
    """{COCO image id: set of the categories of its instance annotations} (an image without any: empty)."""
    try:
        categories = {category["id"]: category["name"] for category in data["categories"]}
        objects = {image["id"]: set() for image in data["images"]}
        annotations = [(annotation["image_id"], annotation["category_id"]) for annotation in data["annotations"]]
    except (KeyError, TypeError) as error:
        raise ToolkitError(f"{path!r} is not a COCO instances file: an image, category or annotation lacks its key "
                           f"{error}; pass COCO's own instances_*.json") from None
    unknown = sorted(set(categories.values()) - set(coco_object_names().phrases.values()))
    if unknown:
        raise ToolkitError(f"{path!r} has categories {unknown[:3]} that are none of COCO's 80; pass COCO's own "
                           f"instances_*.json")
    for image_id, category_id in annotations:
        if image_id not in objects or category_id not in categories:
            raise ToolkitError(f"{path!r} has an annotation of image {image_id!r}, category {category_id!r}, which "
                               f"its 'images' or 'categories' list lacks; pass COCO's own instances_*.json")
        objects[image_id].add(categories[category_id])
    return objects


def coco_image_id(image_id):
    """COCO's id of an image of the data: its cocoid, or the number in its file name (COCO_val2014_000000391895.jpg)."""
    if isinstance(image_id, int):
        return image_id
    match = re.search(r"(\d+)\.\w+$", str(image_id))
    if match is None:
        raise ToolkitError(f"image {image_id!r} has no cocoid and no COCO id in its file name "
                           f"(COCO_val2014_<id>.jpg); --instances needs data made from COCO's Karpathy split")
    return int(match.group(1))
