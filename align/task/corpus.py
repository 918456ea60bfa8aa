"""A movie-review corpus generated in code: the license-clean pretraining text of the default policy.

Reviews are drawn from templates whose slots are filled from the word lists below. Every sentiment
word is one that VADER's lexicon scores (its sign matches its list), and every filler word (titles,
names, aspects, roles, places, neutral adjectives) is absent from the lexicon, so the gold reward
(VADER compound of a completion) is driven by the words the policy chooses, not by noise in the
slots. A review has a mood (positive, negative or mixed) that biases the polarity of its sentences,
so a policy that starts a review well tends to keep going well: there is room to steer, and the
corpus as a whole is balanced. Known VADER traps ("pretty" +2.2; clumsy, sloppy, tedious, witty,
gripping score 0; "friends", "plays", "comedy" score > 0) are deliberately left out.
"""
from __future__ import annotations

import random
import re
from typing import Iterable

TITLE_ADJ = ["Silent", "Crimson", "Hidden", "Distant", "Last", "Northern", "Iron", "Silver", "Midnight",
             "Endless", "Quiet", "Winter", "Summer", "Paper", "Glass", "Stone", "Velvet", "Electric",
             "Golden", "Secret"]
TITLE_NOUN = ["Harbor", "River", "Garden", "Mountain", "Station", "Empire", "Horizon", "Letters", "Kingdom",
              "Signal", "Orchard", "Lighthouse", "Circus", "Frontier", "Machine", "Island", "Voyage", "Tide",
              "Road", "Engine"]
FIRST = ["Anna", "Ben", "Clara", "David", "Elena", "Frank", "Greta", "Henry", "Iris", "Jonas", "Karen", "Leo",
         "Maria", "Nathan", "Olivia", "Paul", "Rosa", "Samuel", "Tara", "Victor"]
LAST = ["Adler", "Brooks", "Carter", "Dalton", "Ellis", "Fischer", "Garner", "Hayes", "Ingram", "Jensen",
        "Keller", "Lowell", "Monroe", "Novak", "Osborne", "Parker", "Quinn", "Reyes", "Sutton", "Turner"]
ROLES = ["detective", "teacher", "doctor", "pilot", "lawyer", "chef", "painter", "journalist", "farmer",
         "sailor", "scientist", "musician", "nurse", "mechanic", "librarian", "boxer", "singer", "soldier"]
# (noun phrase, is plural)
ASPECTS = [("the acting", False), ("the plot", False), ("the script", False), ("the dialogue", False),
           ("the soundtrack", False), ("the cinematography", False), ("the pacing", False),
           ("the ending", False), ("the cast", False), ("the direction", False), ("the editing", False),
           ("the visual effects", True), ("the costumes", True), ("the story", False),
           ("the characters", True), ("the music", False), ("the final act", False),
           ("the opening scene", False), ("the lead performance", False), ("the camera work", False),
           ("the set design", False)]
KINDS = ["film", "movie", "drama", "mystery", "western", "picture", "story"]
POS_ADJ = ["brilliant", "wonderful", "excellent", "great", "beautiful", "superb", "fantastic", "amazing",
           "delightful", "charming", "lovely", "impressive", "perfect", "enjoyable", "engaging", "clever",
           "powerful", "stunning", "entertaining", "solid", "outstanding", "terrific", "magnificent",
           "inspiring", "fresh", "elegant", "hilarious", "funny", "warm", "sweet", "smart", "thrilling",
           "exciting", "marvelous", "splendid", "gorgeous", "good", "nice", "pleasant", "heartfelt", "lively",
           "satisfying", "creative", "original", "intelligent", "remarkable", "fabulous", "compelling"]
NEG_ADJ = ["boring", "dull", "awful", "terrible", "horrible", "bad", "weak", "poor", "disappointing",
           "stupid", "messy", "confusing", "annoying", "ugly", "painful", "lame", "ridiculous", "pathetic",
           "dreadful", "worthless", "unpleasant", "miserable", "embarrassing", "frustrating", "lazy",
           "awkward", "depressing", "irritating", "dumb", "nasty", "empty", "tired", "noisy", "hopeless"]
NEU_ADJ = ["long", "short", "slow", "quiet", "dark", "loud", "simple", "unusual", "familiar", "modest",
           "standard", "complicated", "different", "typical", "conventional", "straightforward", "quirky",
           "plain", "old", "modern", "classic", "epic", "subtle", "steady"]
# VADER boosters and dampeners change the score's size; "rather" and "fairly" are unscored fillers.
ADVERBS = ["very", "really", "extremely", "incredibly", "quite", "rather", "fairly", "somewhat", "slightly",
           "absolutely", "totally", "completely", "so", "deeply", "utterly", "thoroughly"]
POS_VERB = ["loved", "enjoyed", "liked", "adored", "admired", "appreciated"]
NEG_VERB = ["hated", "disliked", "regretted"]
POS_REACT = ["It made me laugh.", "I left the cinema smiling.", "I laughed all the way through.",
             "It made me smile more than once."]
NEG_REACT = ["I was bored after ten minutes.", "It made me cry for the wrong reasons.",
             "I was bored most of the time.", "I cried, and not in a good way."]
AUDIENCES = ["anyone", "everyone", "families", "my parents", "fans of the genre", "young viewers", "adults"]
PLACES = ["a small town", "a coastal village", "the city", "a mountain village", "the desert", "an old house",
          "a train station", "the countryside", "a fishing port", "a busy hospital"]
GOALS = ["returns home", "moves to the city", "looks for a brother", "opens a restaurant",
         "travels across the country", "builds a boat", "starts a new job", "writes a book"]
WHEN = ["last night", "on a Sunday", "at the cinema", "on a long flight", "last weekend", "at home"]
COMPANY = ["my sister", "my brother", "my parents", "my partner", "my kids", "my roommate", "a neighbor"]
DURATIONS = ["two hours", "ninety minutes", "three hours", "an hour and a half", "almost two hours"]
OPENERS = ["", "", "", "Overall, ", "In the end, ", "To be fair, ", "For me, ", "Still, "]

# Filler words that must carry no VADER score (checked in tests).
NEUTRAL_WORDS = sorted({w.lower() for group in (TITLE_ADJ, TITLE_NOUN, FIRST, LAST, ROLES, KINDS, NEU_ADJ,
                                                [a for a, _ in ASPECTS], AUDIENCES, PLACES, GOALS, WHEN,
                                                COMPANY, DURATIONS) for phrase in group
                        for w in phrase.split()})

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)*")


def words(text: str) -> list[str]:
    """Lowercased words of `text` with punctuation stripped ("Great, isn't it?" -> great, isn't, it)."""
    return _WORD.findall(text.lower())


def fluency(texts: Iterable[str], vocabulary: set[str]) -> float:
    """Share of all words in `texts` (pooled, see `words`) that belong to `vocabulary`; 1.0 if no words."""
    ws = [w for t in texts for w in words(t)]
    return sum(w in vocabulary for w in ws) / len(ws) if ws else 1.0


def _an(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


class _Review:
    """Draws the sentences of one review about one movie, lead actor and role."""

    def __init__(self, rng: random.Random):
        self.r = rng
        self.movie = f"{rng.choice(TITLE_ADJ)} {rng.choice(TITLE_NOUN)}"
        if rng.random() < 0.5:
            self.movie = "The " + self.movie
        self.actor = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
        self.director = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
        self.role = rng.choice(ROLES)
        self.kind = rng.choice(KINDS)

    def adj(self, pol: int, adverb_p: float = 0.4) -> str:
        r = self.r
        a = r.choice(POS_ADJ if pol > 0 else NEG_ADJ)
        return f"{r.choice(ADVERBS)} {a}" if r.random() < adverb_p else a

    def aspect(self) -> tuple[str, str]:
        phrase, self.plural = self.r.choice(ASPECTS)
        past = self.r.random() < 0.5
        return phrase, ("were" if self.plural else "was") if past else ("are" if self.plural else "is")

    def feels(self) -> str:
        """The verb agreeing with the aspect drawn last."""
        return "feel" if self.plural else "feels"

    def it(self) -> str:
        return self.r.choice([self.movie, "it", f"the {self.kind}", f"this {self.kind}"])

    def neutral(self) -> str:
        r = self.r
        return r.choice([
            lambda: f"{self.movie} is directed by {self.director}.",
            lambda: f"{self.actor} stars as {_an(self.role)} in {self.movie}.",
            lambda: f"{self.movie} runs {r.choice(DURATIONS)}.",
            lambda: f"The story is set in {r.choice(PLACES)}.",
            lambda: f"I watched it {r.choice(WHEN)} with {r.choice(COMPANY)}.",
            lambda: f"{self.movie} follows {_an(self.role)} who {r.choice(GOALS)}.",
            lambda: f"The {self.kind} is {r.choice(NEU_ADJ)} and {r.choice(NEU_ADJ)}.",
            lambda: "{} {} {}.".format(*self.aspect(), r.choice(NEU_ADJ)),
        ])()

    def opinion(self, pol: int) -> str:
        r = self.r
        adj2 = r.choice(POS_ADJ if pol > 0 else NEG_ADJ)
        return r.choice([
            lambda: "{} {} {}.".format(*self.aspect(), self.adj(pol)),
            lambda: "{} {} {}.".format(*self.aspect(), self.adj(pol)),
            lambda: f"{self.movie} is {_an(self.adj(pol))} {self.kind}.",
            lambda: f"{self.actor} gives {_an(self.adj(pol))} performance as the {self.role}.",
            lambda: f"I found {self.aspect()[0]} {self.adj(pol, 0.2)} and {adj2}.",
            lambda: "{} in {} {} {}.".format(self.aspect()[0], self.movie, self.feels(), self.adj(pol)),
            lambda: "{} {} {}, and {} {} {}.".format(*self.aspect(), self.adj(pol), *self.aspect(), self.adj(pol)),
            lambda: "{} {} {} from start to finish.".format(*self.aspect(), self.adj(pol)),
            lambda: f"{self.movie}, directed by {self.director}, is {self.adj(pol)}.",
            lambda: f"This {self.kind} about {_an(self.role)} who {r.choice(GOALS)} is {self.adj(pol)}.",
            lambda: f"{r.choice(OPENERS)}I think {self.it()} is {self.adj(pol)}.",
            lambda: f"{r.choice(OPENERS)}{self.it()} is {self.adj(pol)}.",
            lambda: f"I {r.choice(POS_VERB if pol > 0 else NEG_VERB)} {self.it()}.",
            lambda: "{} {} {} {}.".format(*self.aspect(), r.choice(["not", "never"]), self.adj(-pol, 0.0)),
            lambda: f"I would {'' if pol > 0 else 'not '}recommend it to {r.choice(AUDIENCES)}.",
            lambda: r.choice(POS_REACT if pol > 0 else NEG_REACT),
        ])()

    def mixed(self) -> str:
        (a1, v1), (a2, v2) = self.aspect(), self.aspect()
        p = self.r.choice([1, -1])
        return self.r.choice([
            lambda: f"{a1} {v1} {self.adj(p)}, but {a2} {v2} {self.adj(-p)}.",
            lambda: f"{self.actor} is {self.adj(p)} as the {self.role}, but {a2} {v2} {self.adj(-p)}.",
            lambda: f"Although {a1} {v1} {self.adj(p, 0.2)}, {a2} {v2} {self.adj(-p)}.",
        ])()

    def sentences(self) -> list[str]:
        r = self.r
        mood = r.choices([1, -1, 0], weights=[0.4, 0.35, 0.25])[0]
        n = r.choice([1, 2, 2, 3, 3, 4])
        out = []
        for i in range(n):
            u = r.random()
            if u < 0.2 or (i == 0 and u < 0.35):
                s = self.neutral()
            elif u < 0.35 or mood == 0 and u < 0.55:
                s = self.mixed()
            else:
                pol = mood if mood and r.random() < 0.85 else r.choice([1, -1])
                s = self.opinion(pol)
            out.append(s[0].upper() + s[1:])
        return out


def generate_reviews(num_sentences: int, seed: int) -> list[list[str]]:
    """Reviews (lists of 1-4 sentences about one movie) totalling `num_sentences`; deterministic in seed."""
    rng = random.Random(seed)
    reviews, total = [], 0
    while total < num_sentences:
        sents = _Review(rng).sentences()[: num_sentences - total]
        reviews.append(sents)
        total += len(sents)
    return reviews


def generate_corpus(num_sentences: int, seed: int) -> list[str]:
    """`num_sentences` review sentences, in review order (see `generate_reviews`); deterministic in seed."""
    return [s for review in generate_reviews(num_sentences, seed) for s in review]
