"""The tabletop world's knowledge base: names, colours and uses of its objects.

- :data:`COLOURS`: colour names and their base RGB.
- :data:`CATEGORIES`: the object categories (:class:`Category`): the noun, the colours an instance
  can have, its typical size and the sentence an explanatory answer gives.
- :data:`AFFORDANCES`: what objects are for (:class:`Affordance`): which categories afford it and
  how a person asks for it ("something to cut with", "I want to drive a nail.").

Pure data, no drawing: :mod:`lisa_agent.data.silhouettes` holds each category's shape,
:mod:`lisa_agent.data.tabletop` draws scenes and :mod:`lisa_agent.data.queries` asks about them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

#: Colour name -> base RGB.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (205, 32, 38), "green": (48, 150, 58), "blue": (38, 78, 196), "yellow": (236, 206, 44),
    "orange": (240, 128, 30), "purple": (122, 52, 158), "black": (38, 38, 42), "white": (236, 236, 230),
    "brown": (122, 76, 40), "silver": (192, 196, 204), "gold": (212, 172, 56), "pink": (236, 120, 172),
}


@dataclass(frozen=True)
class Category:
    """One kind of object.

    Attributes:
        name: category name, also the noun used in queries ("knife", "scissors").
        colours: colour names an instance can have (its main colour: a knife's handle, a mug's body).
        size: typical length of the long side as a fraction of the frame's shorter side.
        explanation: the sentence an explanatory answer gives after ``[SEG].``.
        plural: the noun is plural ("there are no scissors").
    """

    name: str
    colours: tuple[str, ...]
    size: float
    explanation: str
    plural: bool = False


CATEGORIES: dict[str, Category] = {c.name: c for c in (
    Category("knife", ("black", "brown", "red", "blue", "green", "white"), 0.46, "It has a sharp blade."),
    Category("scissors", ("red", "blue", "black", "orange", "green", "yellow"), 0.36,
             "Scissors have two sharp blades.", plural=True),
    Category("mug", ("red", "blue", "white", "green", "yellow", "black", "orange"), 0.30,
             "A mug holds hot drinks and has a handle."),
    Category("bottle", ("green", "blue", "red", "white", "orange"), 0.46, "A bottle holds liquid and has a cap."),
    Category("apple", ("red", "green", "yellow"), 0.24, "An apple is a fruit you can eat."),
    Category("banana", ("yellow", "green"), 0.40, "A banana is a fruit you can eat."),
    Category("ball", ("red", "blue", "orange", "green", "yellow", "white", "purple"), 0.24,
             "A ball is round and can be thrown."),
    Category("book", ("red", "blue", "green", "black", "brown", "orange", "purple"), 0.44, "A book has pages to read."),
    Category("key", ("gold", "silver"), 0.22, "A key opens locks."),
    Category("pen", ("blue", "black", "red", "green"), 0.34, "A pen writes with ink."),
    Category("hammer", ("brown", "red", "black", "yellow"), 0.48, "Its heavy head drives nails."),
    Category("spoon", ("silver", "red", "white", "blue"), 0.34, "A spoon scoops and stirs."),
)}


@dataclass(frozen=True)
class Affordance:
    """What an object is for, as a person would ask for it.

    Attributes:
        name: short id ("cut").
        categories: categories that afford it.
        phrases: noun phrases ("something to cut with"), usable with a colour ("... that is red").
        sentences: full instructions that need no noun phrase ("I want to drive a nail.").
        nothing: the phrase of an honest no-target answer ("nothing to cut with").
    """

    name: str
    categories: frozenset[str]
    phrases: tuple[str, ...]
    sentences: tuple[str, ...]
    nothing: str


def _aff(name: str, cats: str, phrases: Sequence[str], sentences: Sequence[str], nothing: str) -> Affordance:
    return Affordance(name, frozenset(cats.split()), tuple(phrases), tuple(sentences), nothing)


AFFORDANCES: dict[str, Affordance] = {a.name: a for a in (
    _aff("cut", "knife scissors", ("something to cut with", "something sharp", "a tool for cutting"),
         ("Grab something to cut with.", "I need to cut this string, what can I use?",
          "What could I use to cut the tape?"), "nothing to cut with"),
    _aff("slice", "knife", ("something to slice bread with", "a tool with a single long blade"),
         ("I want to slice some bread.", "What would a cook chop vegetables with?"), "nothing to slice bread with"),
    _aff("cut_paper", "scissors", ("something to cut paper with", "a tool with two finger holes"),
         ("I need to cut out a paper shape.", "What has two blades that cross?"), "nothing to cut paper with"),
    _aff("hot_drink", "mug", ("something to hold my coffee", "a cup for hot tea"),
         ("What could hold my coffee?", "I want to drink some hot tea.", "Where can I pour my hot cocoa?"),
         "nothing to hold coffee"),
    _aff("carry_water", "bottle", ("something to carry water in", "a container with a cap"),
         ("I need water for my hike.", "What could I take along to drink on a trip?"), "nothing to carry water in"),
    _aff("liquid", "mug bottle", ("something that holds liquid", "a container for drinks"),
         ("Where could I pour some juice?",), "nothing that holds liquid"),
    _aff("eat", "apple banana", ("something I can eat", "a healthy snack", "a piece of fruit"),
         ("I am hungry, what can I eat?", "Give me a healthy snack."), "nothing to eat"),
    _aff("peel", "banana", ("a fruit you peel before eating", "a long curved fruit"),
         ("What fruit do monkeys love?", "I want a fruit that is easy to peel."), "no fruit to peel"),
    _aff("crunchy", "apple", ("a crunchy round fruit", "the fruit that keeps the doctor away"),
         ("Which fruit keeps the doctor away if I eat one a day?", "I want a crunchy fruit."),
         "no crunchy fruit"),
    _aff("play", "ball", ("something to play catch with", "something round that bounces"),
         ("What could I throw to my dog?", "Let's play a game of catch."), "nothing to play catch with"),
    _aff("read", "book", ("something to read", "something with pages"),
         ("I want to read a story tonight.", "What could I study from?"), "nothing to read"),
    _aff("unlock", "key", ("something that opens a lock", "something to unlock the door with"),
         ("I need to unlock the front door.", "How do I open this padlock?"), "nothing to open a lock with"),
    _aff("write", "pen", ("something to write with", "something to sign a form with"),
         ("I need to jot down a phone number.", "Hand me something to write a note with."), "nothing to write with"),
    _aff("nail", "hammer", ("something to drive a nail with", "a tool to hit nails with"),
         ("I want to drive a nail.", "What can I use to hang a picture on a nail?"), "nothing to drive a nail with"),
    _aff("stir", "spoon", ("something to eat soup with", "something to stir my tea with"),
         ("What can I stir my tea with?", "I want to eat some yogurt."), "nothing to eat soup with"),
)}
