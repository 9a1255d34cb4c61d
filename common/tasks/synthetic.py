"""Deterministic generator of a multi-merchant marketplace: search relevance pairs and reviews.

Merchants differ in category mix and size (long-tailed, non-IID). Queries paraphrase product
types with synonyms, name attributes with variant spellings, and candidates include exact
matches, right-type-wrong-attribute substitutes, sibling-type substitutes, accessories
(complements) and irrelevant products that share words with the query.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TypedDict

ESCI_LABELS = ["exact", "substitute", "complement", "irrelevant"]
SENTIMENT_LABELS = ["negative", "neutral", "positive"]


@dataclass(frozen=True)
class ProductType:
    """A kind of product: title noun, shopper synonyms, attribute dimensions, relations."""

    name: str
    category: str
    synonyms: tuple[str, ...]
    dims: tuple[str, ...] = ()
    accessories: tuple[str, ...] = ()
    siblings: tuple[str, ...] = ()


def _t(name: str, cat: str, syn: str, dims: str = "", acc: str = "", sib: str = "") -> ProductType:
    split = lambda s: tuple(x.strip() for x in s.split("|") if x.strip())  # noqa: E731
    return ProductType(name, cat, split(syn), split(dims), split(acc), split(sib))


TYPES: tuple[ProductType, ...] = (
    _t("smartphone", "electronics", "cell phone|mobile phone|android phone", "storage", "phone case|phone charger|earbuds"),
    _t("wireless headphones", "electronics", "bluetooth headphones|cordless headset|over-ear headphones", "", "headphone stand", "earbuds"),
    _t("earbuds", "electronics", "in-ear buds|earphones|true wireless buds", "", "phone charger", "wireless headphones"),
    _t("phone case", "electronics", "phone cover|protective cover|shockproof case", "material", "", ""),
    _t("phone charger", "electronics", "charging cable|usb-c charger|fast charger", "", "", ""),
    _t("headphone stand", "electronics", "headset holder|headphone hanger", "material"),
    _t("laptop", "electronics", "notebook computer|ultrabook|portable computer", "storage", "laptop sleeve|wireless mouse|mouse pad"),
    _t("laptop sleeve", "electronics", "notebook bag|laptop cover|computer sleeve", "material"),
    _t("wireless mouse", "electronics", "cordless mouse|computer mouse|bluetooth mouse", "", "mouse pad"),
    _t("mouse pad", "electronics", "mousepad|desk mat", "material"),
    _t("smartwatch", "electronics", "fitness watch|activity tracker watch", "", "watch band|phone charger"),
    _t("watch band", "electronics", "watch strap|replacement band", "material"),
    _t("sofa", "home", "couch|settee|sectional", "material", "throw pillow", "loveseat"),
    _t("loveseat", "home", "two-seater couch|small couch", "material", "throw pillow", "sofa"),
    _t("throw pillow", "home", "cushion|accent pillow|decorative pillow", "material"),
    _t("floor lamp", "home", "standing lamp|torchiere|tall lamp", "", "lamp shade", "desk lamp"),
    _t("desk lamp", "home", "table lamp|reading lamp|task light", "", "lamp shade", "floor lamp"),
    _t("lamp shade", "home", "lampshade|light shade", "material"),
    _t("area rug", "home", "carpet|floor rug|living room rug", "size", "rug pad"),
    _t("rug pad", "home", "rug gripper|non-slip rug underlay", "size"),
    _t("coffee maker", "kitchen", "coffee machine|drip brewer|coffee brewer", "capacity", "coffee filters", "espresso machine"),
    _t("espresso machine", "kitchen", "espresso maker|cappuccino machine|barista machine", "", "milk frother", "coffee maker"),
    _t("coffee filters", "kitchen", "paper filters|filter papers", ""),
    _t("milk frother", "kitchen", "foam maker|milk foamer", ""),
    _t("electric kettle", "kitchen", "water boiler|tea kettle|hot water kettle", "capacity", "", ""),
    _t("frying pan", "kitchen", "skillet|fry pan|saute pan", "pan_material", "pan lid|spatula", "wok"),
    _t("wok", "kitchen", "stir fry pan|asian wok", "pan_material", "pan lid|spatula", "frying pan"),
    _t("pan lid", "kitchen", "pot lid|glass lid|skillet cover", ""),
    _t("spatula", "kitchen", "turner|flipper|cooking spatula", "material"),
    _t("chef knife", "kitchen", "kitchen knife|cooking knife|cook's knife", "", "knife sharpener|cutting board"),
    _t("knife sharpener", "kitchen", "whetstone|sharpening stone|honing tool", ""),
    _t("cutting board", "kitchen", "chopping board|carving board", "material"),
    _t("running shoes", "sports", "jogging sneakers|trainers|road runners", "shoe_size", "running socks", "trail shoes"),
    _t("trail shoes", "sports", "hiking sneakers|off-road runners", "shoe_size", "running socks", "running shoes"),
    _t("running socks", "sports", "athletic socks|sport socks", "size"),
    _t("yoga mat", "sports", "exercise mat|workout mat|pilates mat", "", "yoga block|yoga strap"),
    _t("yoga block", "sports", "foam brick|yoga brick", ""),
    _t("yoga strap", "sports", "stretching strap|stretch band", ""),
    _t("dumbbells", "sports", "hand weights|free weights|barbell set", "weight", "weight rack", "kettlebell"),
    _t("kettlebell", "sports", "kettle bell|swing weight", "weight", "weight rack", "dumbbells"),
    _t("weight rack", "sports", "dumbbell stand|weight holder", ""),
    _t("bike helmet", "sports", "cycling helmet|bicycle helmet", "size", "bike light"),
    _t("bike light", "sports", "bicycle lamp|cycling headlight", ""),
    _t("rain jacket", "fashion", "raincoat|waterproof jacket|rain shell", "size", "", "winter coat"),
    _t("winter coat", "fashion", "parka|puffer jacket|down coat", "size", "", "rain jacket"),
    _t("jeans", "fashion", "denim pants|denim trousers", "size", "belt"),
    _t("belt", "fashion", "waist belt|leather strap belt", "size"),
    _t("backpack", "fashion", "rucksack|daypack|school bag", "material", "", "messenger bag"),
    _t("messenger bag", "fashion", "shoulder bag|crossbody bag", "material", "", "backpack"),
    _t("sunglasses", "fashion", "shades|sun glasses|polarized glasses", "", "glasses case"),
    _t("glasses case", "fashion", "eyeglass case|spectacle case", "material"),
    _t("dog bed", "pets", "pet bed|puppy bed|dog cushion", "size", "", "dog crate"),
    _t("dog crate", "pets", "dog kennel|pet cage", "size", "dog bed"),
    _t("dog leash", "pets", "dog lead|walking leash", "", "dog collar"),
    _t("dog collar", "pets", "pet collar|puppy collar", "size"),
    _t("cat litter", "pets", "kitty litter|clumping litter", "", "litter box|litter scoop"),
    _t("litter box", "pets", "litter tray|cat toilet", ""),
    _t("litter scoop", "pets", "litter shovel|poop scoop", ""),
    _t("shampoo", "beauty", "hair wash|hair cleanser", "", "conditioner"),
    _t("conditioner", "beauty", "hair conditioner|detangler", ""),
    _t("face moisturizer", "beauty", "face cream|facial lotion|day cream", "", "", "sunscreen"),
    _t("sunscreen", "beauty", "sunblock|spf lotion|sun cream", "", "", "face moisturizer"),
    _t("electric toothbrush", "beauty", "sonic toothbrush|rechargeable toothbrush", "", "toothbrush heads"),
    _t("toothbrush heads", "beauty", "replacement brush heads|refill heads", ""),
    _t("hair dryer", "beauty", "blow dryer|hairdryer|blowdryer", "", "diffuser attachment"),
    _t("diffuser attachment", "beauty", "dryer diffuser|curl diffuser", ""),
)
TYPE_BY_NAME = {t.name: t for t in TYPES}
CATEGORIES = sorted({t.category for t in TYPES})

# Attribute values: title spelling -> spellings shoppers type.
COLORS = {
    "black": ["black", "ebony", "onyx"], "white": ["white", "ivory", "snow"], "navy blue": ["navy", "marine"],
    "red": ["red", "crimson", "scarlet"], "grey": ["grey", "gray", "charcoal"], "green": ["green", "olive"],
    "pink": ["pink", "rose", "blush"], "beige": ["beige", "tan", "sand"], "brown": ["brown", "chocolate"],
    "silver": ["silver", "metallic", "chrome"],
}
DIMS: dict[str, dict[str, list[str]]] = {
    "material": {"leather": ["leather"], "cotton": ["cotton"], "wool": ["wool", "woolen"],
                 "bamboo": ["bamboo"], "silicone": ["silicone", "rubber"], "linen": ["linen"],
                 "polyester": ["polyester", "synthetic"], "velvet": ["velvet"]},
    "pan_material": {"cast iron": ["cast iron"], "stainless steel": ["stainless", "steel"],
                     "nonstick": ["non-stick", "teflon"], "copper": ["copper"]},
    "storage": {"64GB": ["64gb", "64 gb"], "128GB": ["128gb", "128 gigabyte"],
                "256GB": ["256gb", "256 gb"], "512GB": ["512gb", "half terabyte"]},
    "capacity": {"1 liter": ["1l", "1 litre", "small"], "1.7 liter": ["1.7l", "1.7 litre"],
                 "12-cup": ["12 cup", "twelve cup", "large"], "4-cup": ["4 cup", "four cup"]},
    "size": {"small": ["small", "size s"], "medium": ["medium", "size m"], "large": ["large", "size l"],
             "extra large": ["xl", "extra large"]},
    "shoe_size": {"size 7": ["size 7", "7"], "size 8": ["size 8", "8"], "size 9": ["size 9", "9"],
                  "size 10": ["size 10", "10"], "size 11": ["size 11", "11"]},
    "weight": {"5 lb": ["5 lb", "5 pound"], "10 lb": ["10 lb", "10 pound"], "15 lb": ["15 lb", "15 pound"],
               "20 lb": ["20 lb", "20 pound"]},
}
BRANDS = ["Aurora", "Kestrel", "Norden", "Vantage", "Lumio", "Bramble", "Cobalt", "Tideway",
          "Pinecrest", "Orbit", "Halcyon", "Juniper"]
TITLE_EXTRAS = ["", "", "Premium", "Classic", "Pro", "Deluxe", "Eco", "Compact", "2-Pack", "New Edition"]
QUERY_TEMPLATES = [
    "{a} {t}", "{t} {a}", "{a} {t}", "{t} {a}", "best {a} {t}", "cheap {a} {t}",
    "{t} in {a}", "{a} {t} for gift", "{t} {a} sale", "{b} {a} {t}", "{b} {t} {a}", "{b} {a} {t}",
]


@dataclass
class _Product:
    ptype: ProductType
    color: str
    attr: str | None
    brand: str
    extra: str
    attrs: dict[str, str] = field(default_factory=dict)

    def title(self, rng: random.Random) -> str:
        parts = [self.brand, self.extra, self.color.title() if rng.random() < 0.5 else self.color]
        if self.attr:
            parts.append(self.attr)
        noun = rng.choice(self.ptype.synonyms) if rng.random() < 0.5 else self.ptype.name
        parts.append(noun.title() if rng.random() < 0.5 else noun)
        title = " ".join(p for p in parts if p)
        if rng.random() < 0.3:
            title += rng.choice([", free shipping", " - 1 year warranty", " (renewed)", ", gift box"])
        return title

    def value(self, dim: str) -> str | None:
        """The product's value of an attribute dimension (colour, or its type's first dimension)."""
        if dim == "color":
            return self.color
        return self.attr if self.ptype.dims and self.ptype.dims[0] == dim else None


@dataclass(frozen=True)
class Intent:
    """What a query asks for: a product type, attribute values, and a brand ("" when it names none)."""

    ptype: ProductType
    wanted: dict[str, str]
    brand: str


def judge(intent: Intent, product: _Product) -> str:
    """The ESCI label of a product for a query, by the rules every generated label follows: the asked type with
    every asked attribute and brand is exact, the type with one wrong (or a sibling type) a substitute, an
    accessory of the type a complement, anything else irrelevant."""
    t, want = product.ptype, intent.ptype
    if t.name == want.name:
        fits = all(product.value(d) == v for d, v in intent.wanted.items())
        return "exact" if fits and (not intent.brand or product.brand == intent.brand) else "substitute"
    if t.name in want.siblings:
        return "substitute"
    return "complement" if t.name in want.accessories else "irrelevant"


def _product(rng: random.Random, ptype: ProductType, fixed: dict[str, str], brand: str = "") -> _Product:
    color = fixed.get("color") or rng.choice(list(COLORS))
    attr = None
    if ptype.dims:
        attr = fixed.get(ptype.dims[0]) or rng.choice(list(DIMS[ptype.dims[0]]))
    return _Product(ptype, color, attr, brand or rng.choice(BRANDS), rng.choice(TITLE_EXTRAS))


def _query(rng: random.Random, ptype: ProductType, wanted: dict[str, str], brand: str) -> tuple[str, bool]:
    """Query text and whether it names the brand."""
    words = []
    for dim, value in wanted.items():
        table = COLORS if dim == "color" else DIMS[dim]
        words.append(rng.choice(table[value]))
    type_text = rng.choice(ptype.synonyms) if rng.random() < 0.6 else ptype.name
    template = rng.choice(QUERY_TEMPLATES) if words else rng.choice(["{t}", "best {t}", "{t} deals", "{b} {t}"])
    query = template.format(a=" ".join(words), t=type_text, b=brand.lower())
    return " ".join(query.split()), "{b}" in template


def _mismatch(rng: random.Random, dim: str, value: str) -> str:
    table = COLORS if dim == "color" else DIMS[dim]
    return rng.choice([v for v in table if v != value])


def _merchant_profiles(rng: random.Random, num_merchants: int, concentration: float) -> list[tuple[float, list[float]]]:
    """(size weight, category mix) per merchant: Zipf-like sizes, Dirichlet category mixes."""
    profiles = []
    for rank in range(num_merchants):
        size = 1.0 / (rank + 1) ** 0.9
        mix = [rng.gammavariate(concentration, 1.0) for _ in CATEGORIES]
        total = sum(mix)
        profiles.append((size, [m / total for m in mix]))
    return profiles


def _allocate(total: int, weights: list[float], minimum: int) -> list[int]:
    """Split `total` items over weights, at least `minimum` each (long tail kept)."""
    s = sum(weights)
    return [max(minimum, int(round(total * w / s))) for w in weights]


def _intent(rng: random.Random, mix: list[float]) -> tuple[Intent, str, str]:
    """A shopper's intent drawn from a merchant's category mix, the query text they type for it, and the brand
    drawn with it (named by the query or not: it also brands one irrelevant candidate)."""
    category = rng.choices(CATEGORIES, weights=mix)[0]
    ptype = rng.choice([t for t in TYPES if t.category == category])
    wanted: dict[str, str] = {}
    if rng.random() < 0.7:
        wanted["color"] = rng.choice(list(COLORS))
    if ptype.dims and rng.random() < 0.6:
        wanted[ptype.dims[0]] = rng.choice(list(DIMS[ptype.dims[0]]))
    brand = rng.choice(BRANDS)
    query, brand_wanted = _query(rng, ptype, wanted, brand)
    return Intent(ptype, wanted, brand if brand_wanted else ""), query, brand


def _candidates(rng: random.Random, intent: Intent, brand: str) -> list[_Product]:
    """The products judged for a query: exact matches, substitutes (another brand, one wrong attribute or a
    sibling type), an accessory, and irrelevant products, one of them of the query's category and brand."""
    ptype, wanted = intent.ptype, intent.wanted
    cands = [_product(rng, ptype, wanted, intent.brand) for _ in range(rng.randint(2, 3))]
    for _ in range(rng.randint(1, 2)):
        if intent.brand and rng.random() < 0.4:
            cands.append(_product(rng, ptype, wanted, rng.choice([b for b in BRANDS if b != intent.brand])))
        elif wanted and rng.random() < 0.7:
            dim = rng.choice(list(wanted))
            cands.append(_product(rng, ptype, dict(wanted, **{dim: _mismatch(rng, dim, wanted[dim])}),
                                  intent.brand))
        elif ptype.siblings:
            sib = TYPE_BY_NAME[rng.choice(ptype.siblings)]
            cands.append(_product(rng, sib, {"color": wanted.get("color", "")}))
    if ptype.accessories:
        cands.append(_product(rng, TYPE_BY_NAME[rng.choice(ptype.accessories)], {"color": wanted.get("color", "")}))
    same_cat = [t for t in TYPES if t.category == ptype.category and t.name != ptype.name
                and t.name not in ptype.accessories and t.name not in ptype.siblings]
    others = [t for t in TYPES if t.category != ptype.category]
    hard = rng.choice(same_cat) if same_cat else rng.choice(others)
    cands.append(_product(rng, hard, {"color": wanted.get("color", "")}, brand))
    cands.append(_product(rng, rng.choice(others), {}))
    rng.shuffle(cands)
    return cands


def _queries(rng: random.Random, profiles: list[tuple[float, list[float]]],
             counts: list[int]) -> Iterator[tuple[str, Intent, str, list[_Product]]]:
    """(merchant, intent, query text, judged candidates) for counts[m] queries of every merchant m, drawn lazily
    (the caller's own draws for a query's rows come before the next query's)."""
    for m, ((_, mix), n_queries) in enumerate(zip(profiles, counts, strict=True)):
        for _ in range(n_queries):
            intent, query, brand = _intent(rng, mix)
            yield f"merchant_{m:02d}", intent, query, _candidates(rng, intent, brand)


def generate_relevance(num_merchants: int = 8, num_queries: int = 300, seed: int = 0,
                       concentration: float = 0.3, label_noise: float = 0.02) -> list[dict[str, object]]:
    """Query-product pairs labelled exact/substitute/complement/irrelevant by `judge`, one merchant each; a
    fraction label_noise of labels is then redrawn at random (annotator noise)."""
    rng = random.Random(seed)
    profiles = _merchant_profiles(rng, num_merchants, concentration)
    counts = _allocate(num_queries, [p[0] for p in profiles], minimum=8)
    rows: list[dict[str, object]] = []
    for qid, (merchant, intent, query, cands) in enumerate(_queries(rng, profiles, counts)):
        for product in cands:
            label = judge(intent, product)
            if rng.random() < label_noise:
                label = rng.choice(ESCI_LABELS)
            rows.append({
                "query_id": f"q{qid:05d}", "query": query, "product_id": f"p{len(rows):06d}",
                "product_title": product.title(rng), "category": product.ptype.category,
                "esci_label": label, "merchant": merchant,
            })
    return rows


SIZE_DIMS = ("size", "shoe_size", "storage", "capacity", "weight")
HARD_KINDS = ("colour", "size", "brand", "sibling", "accessory")


class HardQuery(TypedDict):
    """A hard query: its kind, its text, and the titles it is scored on (the exact product first)."""

    kind: str
    query: str
    titles: list[str]


@dataclass
class JudgedSet:
    """The built-in marketplace's held-out evaluation: judged (query, product) pairs, a catalog of every product
    they name judged against every query, and hard queries (one exact product among close confusers)."""

    rows: list[dict[str, object]]
    queries: list[str]
    catalog: list[dict[str, str]]
    judgements: list[list[str]]  # judgements[q][p]: the label of catalog product p for query q
    hard: list[HardQuery]


@functools.lru_cache(maxsize=1)  # a process asks for the same set many times
def generate_judged(num_merchants: int, num_queries: int, seed: int, concentration: float,
                    num_hard: int) -> JudgedSet:
    """A held-out test set of num_queries fresh queries from the same merchants as generate_relevance(seed)
    (their sizes and category mixes), labelled by `judge` without noise, plus its catalog and hard queries."""
    profiles = _merchant_profiles(random.Random(seed), num_merchants, concentration)
    rng = random.Random(f"fedshop-judged:{seed}")
    counts = _allocate(num_queries, [p[0] for p in profiles], minimum=1)
    rows: list[dict[str, object]] = []
    queries: list[str] = []
    intents: list[Intent] = []
    products: list[_Product] = []
    catalog: list[dict[str, str]] = []
    for qid, (merchant, intent, query, cands) in enumerate(_queries(rng, profiles, counts)):
        queries.append(query)
        intents.append(intent)
        for product in cands:
            pid = f"c{len(catalog):06d}"
            title = product.title(rng)
            products.append(product)
            catalog.append({"id": pid, "title": title, "category": product.ptype.category, "brand": product.brand,
                            "type": product.ptype.name})
            rows.append({"query_id": f"t{qid:05d}", "query": query, "product_id": pid, "product_title": title,
                         "category": product.ptype.category, "esci_label": judge(intent, product),
                         "merchant": merchant})
    judgements = [[judge(intent, p) for p in products] for intent in intents]
    return JudgedSet(rows, queries, catalog, judgements, _hard_queries(rng, num_hard))


def _hard_query(rng: random.Random, kind: str) -> HardQuery:
    """One hard query of `kind`: the exact product's title first, then three confusers judged below it."""
    if kind == "size":
        ptype = rng.choice([t for t in TYPES if t.dims and t.dims[0] in SIZE_DIMS])
    elif kind in ("sibling", "accessory"):
        ptype = rng.choice([t for t in TYPES if (t.siblings if kind == "sibling" else t.accessories)])
    else:
        ptype = rng.choice(TYPES)
    wanted = {"color": rng.choice(list(COLORS))}
    if kind == "size":
        wanted[ptype.dims[0]] = rng.choice(list(DIMS[ptype.dims[0]]))
    brand = rng.choice(BRANDS) if kind == "brand" else ""
    intent = Intent(ptype, wanted, brand)
    exact = _product(rng, ptype, wanted, brand)
    confusers = []
    for _ in range(3):
        if kind == "colour":
            other = _product(rng, ptype, dict(wanted, color=_mismatch(rng, "color", wanted["color"])), exact.brand)
        elif kind == "size":
            dim = ptype.dims[0]
            other = _product(rng, ptype, dict(wanted, **{dim: _mismatch(rng, dim, wanted[dim])}), exact.brand)
        elif kind == "brand":
            other = _product(rng, ptype, wanted, rng.choice([b for b in BRANDS if b != brand]))
        else:
            related = ptype.siblings if kind == "sibling" else ptype.accessories
            other = _product(rng, TYPE_BY_NAME[rng.choice(related)], {"color": wanted["color"]}, exact.brand)
        confusers.append(other)
    query, _ = _query(rng, ptype, wanted, brand)
    if brand and brand.lower() not in query:
        query = f"{brand.lower()} {query}"
    assert judge(intent, exact) == "exact" and all(judge(intent, c) != "exact" for c in confusers)
    return {"kind": kind, "query": query, "titles": [p.title(rng) for p in [exact, *confusers]]}


def _hard_queries(rng: random.Random, n: int) -> list[HardQuery]:
    """n hard queries, the kinds in turn."""
    return [_hard_query(rng, HARD_KINDS[i % len(HARD_KINDS)]) for i in range(n)]


POSITIVE = ["works perfectly", "exceeded my expectations", "is exactly as described", "feels really sturdy",
            "was worth every penny", "arrived quickly and works great", "is the best I have owned"]
NEGATIVE = ["stopped working after a week", "is flimsy and cheap", "looks nothing like the photos",
            "broke on the first day", "was a waste of money", "arrived damaged", "is uncomfortable to use"]
NEUTRAL = ["does the job", "is okay for the price", "is average", "works as expected, nothing special",
           "is fine but the color is slightly off", "is decent"]
NEGATED_POS = ["is not bad at all", "could not be happier with it", "has no complaints from me"]
NEGATED_NEG = ["is not worth it", "did not live up to the hype", "is not as sturdy as I hoped"]


def generate_reviews(num_merchants: int = 8, num_reviews: int = 1500, seed: int = 0,
                     concentration: float = 0.3, label_noise: float = 0.02) -> list[dict[str, object]]:
    """Product reviews labelled negative/neutral/positive, including negations and mixed opinions."""
    rng = random.Random(seed + 1)
    profiles = _merchant_profiles(rng, num_merchants, concentration)
    per_merchant = _allocate(num_reviews, [p[0] for p in profiles], minimum=20)
    rows: list[dict[str, object]] = []
    for m, ((_, mix), n) in enumerate(zip(profiles, per_merchant, strict=True)):
        for _ in range(n):
            category = rng.choices(CATEGORIES, weights=mix)[0]
            ptype = rng.choice([t for t in TYPES if t.category == category])
            name = rng.choice((ptype.name, *ptype.synonyms))
            label = rng.choices(SENTIMENT_LABELS, weights=[0.3, 0.2, 0.5])[0]
            if label == "positive":
                body = rng.choice(POSITIVE + NEGATED_POS)
                tail = rng.choice(["", " Would buy again.", " Though shipping was slow.", " Five stars."])
            elif label == "negative":
                body = rng.choice(NEGATIVE + NEGATED_NEG)
                tail = rng.choice(["", " Returning it.", " The box looked nice though.", " One star."])
            else:
                body = rng.choice(NEUTRAL)
                tail = rng.choice(["", " Great price but mediocre quality.", " Some good, some bad."])
            if rng.random() < label_noise:
                label = rng.choice(SENTIMENT_LABELS)
            rows.append({"review_id": f"r{len(rows):06d}", "review_text": f"This {name} {body}.{tail}",
                         "rating_label": label, "category": category, "merchant": f"merchant_{m:02d}"})
    return rows
