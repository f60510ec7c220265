"""Fictitious facts for the built-in demo: invented people with birthplaces, professions and books.

Names and places are assembled from syllables, so no real person or text is involved and the same
seed always gives the same set.
"""
from __future__ import annotations

import random

from .errors import PertaError
from .data import QA

_ONSETS = ["Ka", "Vel", "Dra", "Mor", "Ti", "Sel", "Bra", "Quo", "Ny", "Zer", "Lu", "Fen", "Or", "Gal", "Rhu", "Ise"]
_MIDDLES = ["ri", "no", "va", "len", "ta", "mi", "do", "sa", "ru", "ke"]
_ENDS = ["n", "ra", "th", "s", "mir", "dor", "wyn", "ssa", "lo", "vek"]
_PROFESSIONS = ["glassblower", "cartographer", "beekeeper", "clockmaker", "violinist", "astronomer",
                "blacksmith", "botanist", "lighthouse keeper", "perfumer", "tightrope walker", "bookbinder"]
_BOOK_NOUNS = ["Lanterns", "Rivers", "Echoes", "Orchards", "Mirrors", "Harbors", "Feathers", "Bells"]
_BOOK_PLACES = ["the Salt Coast", "the Tin Valley", "the Ninth Moon", "the Quiet Tower", "the Amber Road",
                "the Glass Forest", "the Last Winter", "the Hollow Hills"]


def _word(rng: random.Random) -> str:
    return rng.choice(_ONSETS) + rng.choice(_MIDDLES) + rng.choice(_ENDS)


def make_people(n: int = 10, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    people, used = [], set()
    while len(people) < n:
        name = f"{_word(rng)} {_word(rng)}"
        city = _word(rng)
        if name in used or city in used:
            continue
        used.update((name, city))
        people.append({
            "name": name, "city": city, "profession": rng.choice(_PROFESSIONS),
            "book": f"{rng.choice(_BOOK_NOUNS)} of {rng.choice(_BOOK_PLACES)}",
            "year": rng.randint(1890, 1990),
        })
    return people


_FACTS = (("Where was {name} born?", "{name} was born in {city}.", "city"),
          ("What is the profession of {name}?", "{name} is a {profession}.", "profession"),
          ("Which book did {name} write?", "{name} wrote {book}.", "book"),
          ("In which year was {name} born?", "{name} was born in {year}.", "year"))


def facts_of(p: dict) -> list[QA]:
    return [QA(q.format(**p), a.format(**p)) for q, a, _ in _FACTS]


def fact_values(people: list[dict]) -> dict[str, str]:
    """{question: the fact its answer must give} (a city, a profession, a book, a year): an answer that does not
    contain it no longer gives the fact."""
    return {q.format(**p): str(p[key]) for p in people for q, _, key in _FACTS}


def make_facts(n_people: int = 10, n_forget: int = 2, seed: int = 0) -> tuple[list[QA], list[QA]]:
    """(forget rows, retain rows): the facts of the first `n_forget` people are the forget set."""
    if not 0 < n_forget < n_people:
        raise PertaError(f"--forget-people {n_forget} with --people {n_people}: at least one person must be "
                         "forgotten and at least one kept")
    people = make_people(n_people, seed)
    forget = [qa for p in people[:n_forget] for qa in facts_of(p)]
    retain = [qa for p in people[n_forget:] for qa in facts_of(p)]
    return forget, retain


def holdout_people(n_people: int, n_holdout: int, seed: int = 0) -> list[dict]:
    """`n_holdout` more invented people of the same seed, after the `n_people` that make_facts uses (the same
    draws continue, so those stay as they are): facts of their kind no model trained on."""
    return make_people(n_people + n_holdout, seed)[n_people:]
