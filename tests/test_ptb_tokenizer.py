"""ptb_tokenizer.py against pycocoevalcap's PTBTokenizer (Stanford CoreNLP, Java): the same tokens and scores."""
import ptb_tokenizer

import itertools
import shutil

import pytest
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

import metrics
from shapes import scene_at

needs_java = pytest.mark.skipif(shutil.which("java") is None,
                                reason="Java is not installed: the Java PTB tokenizer is the reference")

# Captions as people write them: punctuation, contractions, numbers, hyphens, quotes, brackets, abbreviations,
# accented words, spacing. URLs, e-mail addresses and @handles are left out (see ptb_tokenizer's limits).
CAPTIONS = """\
A man riding a wave on top of a surfboard.
a group of people standing around a table with food .
Two giraffes standing next to each other in a field.
A woman's hand holding a cell phone.
There's a cat that isn't sleeping on the couch
The dog won't fetch the frisbee, it's tired.
A bowl of soup (tomato) next to a sandwich.
A sign that says "No Parking" on a pole.
a 10-year-old girl's birthday cake with 10 candles
The bus is number 42, going to 5th Ave.
A man wearing a t-shirt that reads 'I <3 NY'.
A train at the station... waiting
Is that a dog? Yes!
People at a café in Paris.
A naïve painting of a château
A plate with crème brûlée and a fork
An old man, a young boy, and a dog.
a kitchen with stainless-steel appliances and a 2-door fridge
The clock reads 12:45.
A street sign for Main St. and 1st Ave.
A U.S. Navy ship in the harbor
The Mr. Whippy ice cream van
A boy, who's about 5, plays.
They'd been waiting; we'll see.
I'm not sure what this is
A couple of people skiing down a snow-covered slope.
A laptop computer sitting on top of a desk next to a mouse.
A man holding a tennis racquet on a tennis court .
Cows grazing in a field -- a barn behind them.
A pizza with pepperoni, olives & cheese.
THREE MEN IN A BOAT.
a    dog   with    many spaces
 leading space caption
trailing space caption   
A 1950's car parked at a curb.
The 90's style room
A sign: "Welcome to Café Ñoño"
A woman in a red dress; she's smiling!
A kid eating a hot-dog at the ball-park.
It's 3.14 miles to the 1,250 ft. peak
A dog's and a cat's bowls
The players' uniforms are blue
An elephant walking through a grassy field..
A man holding a sign that says "Will work for food"...
A zebra standing in the dirt?!
an airplane flying in the sky (at sunset)
a photo of a [blurry] cat
a toy {red} car
"A cat," she said.
a 3d model of a dog
A man wearing glasses and a hat etc.
A man wearing glasses etc. A woman too.
Mt. Fuji in the background
the dog is on a mat vs. the cat on a bed
A red-and-white striped umbrella
Looking at the man's 'selfie' stick
a cup of coffee - hot
a cup of coffee — hot
a cup of coffee – hot
“Smart” phones on a table
‘Quoted’ thing here
A man’s dog isn’t big
It’s a cat’s toy
I cannot see the Cannot sign
They're gonna wanna eat, gotta go, lemme see, gimme that
'Tis the season and 'twas the night
Rock 'n' roll band
O'Reilly's book and O'Neill's cat
Y'all come back
He's gotta go
5 p.m. on Tuesday and the a.m. commute
A 6'5" tall man
a 12" pizza
a 2x4 and a 3x5 card
50% off sale!
Price: $5.99 or $1,000.50
£10 note, €20 and 50¢
a C++ book
AT&T store and R&B music
Ain't can't won't don't shan't
we've you'll he'd I'm
a dog.a cat and end.Start
the e.g. and i.e. case
the a.b.c.d thing
a ✓ ★ ♥ → • ∞ sign
a ™ and ® and © and ° and × mark
a man… and … done
a man. . . and
a man....... done
a - b -- c --- d ---- e ----- f
a -5 and +5 and 5-3
the dog_cat and * and ** and =
a = b and a/b and a / b and and/or
hello!!! what??? ok?!?
a ¿que? ¡si!
a ¼ cup and ½ pound and a 2 1/2 inch nail
tab\tseparated\twords
2020-01-01 and 1/1/2020 and 12-25-14
version 2.0.1 and 1.5x zoom
1st 2nd 3rd 4th 21st
the '60s and 60's
hi, i.e., ok
A kid's toy, etc., on a mat.
Don't DON'T Isn't
y'know 'em
an 'apple' and 'apple' first
the end.)
(the end.)
A.
a. b. c.
x-ray and a T-shirt
a 3-year-old boy's 10th birthday at 5:30pm on 12/25/2014.
Wait... what?! No -- yes - ok.
A sign (red) on [the] wall {x}.
A dog; a cat: a bird! Really?
Ñandú über Straße ÉCOLE
fish 'n' chips
a man ... and a woman.... also
dogs' toys are kids'
A sign says STOP. A man walks.
The St. Louis arch at 3 a.m.
Mrs. Smith and Dr. Jones at Oak Rd.
a photo taken in Jan. 2010
the Acme Inc. building
"
''
...
-
a single-word
Café
a hand-held co-ed e-mail mother-in-law's car
I'M DON'T CAN'T WON'T THEY'RE HE'LL SHE'D WE'VE IT'S
DON’T CAN’T It’S
at 10 o'clock and rock'n'roll and don'ts
a pro-life and anti-war and anti- war and self- made sign
mid-1990s car in the 1950s
A/C unit w/ a 6ft pole and a 5'10 man and a 3' board
it`s a dog and it´s a cat and dog`s bowl
the dogs`
a man 's dog
a 'n b
1. first 2. second
#2 and 2's and a 's' shape
a b-52 bomber and F-16 jet and a 747 plane
a 4-way stop and a 3-D movie
a 1-2 punch
a 12-pack
-a dash first
a dog-
a dog - - cat
the "dog's" bone
"it's" fine
'tis' and 'twas'
the 2000's and '00s
a 10x10 room and 1080p tv
a 1.5-liter bottle and a 0.5 cup and .5 inch and 5. and 5.0
a phone # and a +1 and 1+1=2
a b/w photo
a b&w photo
a 50/50 chance and 24/7 store and 9/11 memorial
an A+ grade and a grade-A egg
the U.K. and the UK and U.N. flag
Ave. and ave. and Blvd. and ST.
a T.V. and a TV and a t.v. stand
the N.Y.C. skyline
""".splitlines()

SUBJECTS = ["A man", "a woman", "Two dogs", "The cat", "A young girl's kite", "Some people", "A café's owner",
            "An old, rusty bicycle", "A black-and-white photo of a bus", "a group of 3 kids"]
ACTIONS = ["is sitting on a bench", "isn't looking at the camera", "they're riding horses", "(in the rain) walks",
           "holds a sign reading \"SALE\"", "stands next to a 2-story house", "eats a $3.50 hot-dog",
           "plays with a naïve puppy", "won't leave the 1,000 sq. ft. room", "waits at the U.S. border"]
ENDINGS = [".", " .", "", "!", "...", " ?", ". ", ";", ",", '."']


def generated_captions():
    """300 captions: every subject with every action, three times, each time with other endings."""
    pairs = list(itertools.product(SUBJECTS, ACTIONS))
    return [f"{subject} {action}{ENDINGS[(index + shift) % len(ENDINGS)]}"
            for shift in (0, 3, 7) for index, (subject, action) in enumerate(pairs)]


def shapes_references():
    """The raw reference captions of 100 shapes scenes (5 each), as the demo's data set writes them."""
    return [sentence for index in range(100) for sentence in scene_at(0, index)[1]]


def by_image(captions):
    """{image: [{"caption": ...}]}, the input of both tokenizers, 3 captions an image."""
    return {image: [{"caption": caption} for caption in captions[start:start + 3]]
            for image, start in enumerate(range(0, len(captions), 3))}


@needs_java
@pytest.mark.parametrize("captions", [CAPTIONS, generated_captions(), shapes_references()],
                         ids=["written", "generated", "shapes"])
def test_python_tokens_equal_java_tokens(captions):
    assert len(captions) >= 100
    captions_by_image = by_image(captions)
    java = PTBTokenizer().tokenize(captions_by_image)
    python = ptb_tokenizer.tokenize(captions_by_image)
    differences = [(caption["caption"], java_caption, python_caption)
                   for image, image_captions in captions_by_image.items()
                   for caption, java_caption, python_caption in zip(image_captions, java[image], python[image])
                   if java_caption != python_caption]
    assert differences == []
    assert python == java


def test_tokens_without_java():
    tokenized = ptb_tokenizer.tokenize({"a": [{"caption": "A man's dog isn't running (fast)."}],
                                        "b": [{"caption": 'He said "hello", cannot stop.'}, {"caption": ""}]})
    assert tokenized == {"a": ["a man 's dog is n't running -lrb- fast -rrb-"],
                         "b": ["he said hello can not stop", ""]}


SCORED_PREDICTIONS = {1: "A man's riding a horse on the beach.", 2: "a cat (grey) sitting on a table",
                      3: "Two dogs play in the snow!", 4: "A plate of food, isn't it?", 5: "A café's 2-door fridge"}
SCORED_REFERENCES = {
    1: ["A man rides a brown horse on the sand.", "A person riding a horse on a beach ."],
    2: ["a cat sitting on a wooden table", "The cat's on the table.", "A grey cat lies on a kitchen-table"],
    3: ["Two dogs playing in snow", "Dogs run through the snow, happily."],
    4: ["A plate of food with vegetables.", "Food on a white plate; it's lunch."],
    5: ["A fridge with 2 doors in a café.", "The café's fridge is open"],
}


@needs_java
def test_scores_with_the_python_tokenizer_equal_those_with_java():
    metrics.java_unavailable_reason.cache_clear()
    java = metrics.coco_caption_metrics(SCORED_PREDICTIONS, SCORED_REFERENCES, tokenizer="java")
    python = metrics.coco_caption_metrics(SCORED_PREDICTIONS, SCORED_REFERENCES, tokenizer="python")
    assert (java["tokenizer"], python["tokenizer"]) == ("java", "python")
    keys = [*metrics.COCO_BLEU_KEYS, "rouge_l", "cider"]
    assert {key: python["scores"][key] for key in keys} == pytest.approx(
        {key: java["scores"][key] for key in keys}, abs=1e-9, rel=0)
    assert 0 < python["scores"]["coco_bleu4"] < 1 and python["scores"]["cider"] > 0
