"""Word lists for the built-in haystack text and the synthetic tasks' keys, names and places.

The needle vocabularies (`KEY_NOUNS`, `SURNAMES`) are split in two fixed halves: the ``train`` split
draws only from the first half and the ``eval`` split only from the second, which is what makes
training and evaluation samples disjoint (see `apb.data.synthetic`).
"""

from __future__ import annotations


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


# Filler grammar: "The <adj> <noun> <verb> the <adj> <noun> <prep> the <place> <tail>."
FILLER_ADJECTIVES = _words(
    "old quiet bright narrow heavy gentle small broad early late green silver wooden patient busy "
    "distant calm careful simple honest hidden open steady warm cold dusty clean plain golden young"
)
FILLER_NOUNS = _words(
    "farmer river teacher garden window merchant lantern road village bridge sailor orchard market "
    "kettle baker letter wagon meadow harbor shepherd clock table painter forest mill tower field "
    "student candle doctor valley"
)
FILLER_VERBS = _words(
    "watched carried followed painted mended counted visited crossed greeted found opened described "
    "remembered noticed cleaned planted measured passed"
)
FILLER_PREPOSITIONS = _words("near behind beside across under above along beyond through")
FILLER_PLACES = _words(
    "town square hill station church school harbor wall kitchen library workshop gate chapel yard"
)
FILLER_TAILS = (
    "before the rain came",
    "after a long day",
    "while the bells rang",
    "in the morning light",
    "without a single word",
    "as the evening grew dark",
    "on the first day of spring",
    "when nobody was looking",
    "for the third time that week",
    "with great care",
    "",
    "",
    "",
)

# Needle keys are "<adjective>-<noun>"; the noun list is halved between the splits.
KEY_ADJECTIVES = _words(
    "amber brave crimson dusky eager fancy gloomy hollow icy jolly keen lively misty noble odd proud "
    "quick rusty shiny tidy unusual vivid wild young zesty bold clever damp fierce grand humble lucky"
)
KEY_NOUNS = _words(
    # train half (32)
    "apple badger cactus dolphin engine falcon guitar harp igloo jacket kiwi lemon magnet needle "
    "octopus pepper quartz rocket saddle tiger umbrella violin walrus yacht zebra anchor bucket "
    "compass drum feather goblet hammer "
    # eval half (32)
    "iris jigsaw kayak ladder mango nutmeg oyster pelican quiver raven scooter tulip unicorn vase "
    "whistle xylophone yogurt zipper acorn beetle canoe donkey eagle fossil glacier helmet island "
    "jaguar kettledrum lobster marble nectar"
)

# QA facts: "<first> <surname>" people and the city they live in; surnames are halved between splits.
FIRST_NAMES = _words(
    "Alice Bruno Clara Dmitri Elena Felix Grace Hugo Ingrid Jonas Karin Leo Maya Nils Olga Pavel "
    "Quinn Rosa Stefan Tara Umar Vera Walter Xenia Yusuf Zoe"
)
SURNAMES = _words(
    # train half (24)
    "Abbott Barker Castle Dunmore Ellery Fairfax Garland Hollis Irving Jarrow Kendall Lowell "
    "Mercer Norwood Oakley Prescott Quill Radley Sterling Thorne Upton Vance Whitlock Yardley "
    # eval half (24)
    "Ashdown Bramble Carrow Delaney Eastwood Fenwick Gilmore Harlow Inglis Jessop Kingsley Lockhart "
    "Merriman Nettles Orwin Pendry Quarrie Rushford Selwyn Tillman Underhill Varley Wexford Yeoman"
)
CITIES = _words(
    "Oslo Dublin Leiden Utrecht Madrid Tartu Warsaw Zagreb Riga Tallinn Helsinki Minsk Gdansk "
    "Geneva Krakow Bergen Seville Turin Ghent Bruges Malmo Aarhus Bologna"
)

SPLITS = ("train", "eval")


def split_half(words: tuple[str, ...] | list[str], split: str) -> list[str]:
    """The half of `words` that belongs to `split` (``train``: first half, ``eval``: second half)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    half = len(words) // 2
    return list(words[:half]) if split == "train" else list(words[half:])


TEMPLATE_WORDS = _words(
    "One of the special magic numbers for is What are all mentioned in the provided text Find variables "
    "that assigned value above VAR In which city does live lives Question Answer user assistant system"
)
"""Words of the tasks' needle and question templates (for the tiny tokenizer's training corpus)."""
