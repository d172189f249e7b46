"""A small synthetic dataset with power-law popularity and item texts.

Written in the format of ../shared/datasets so the demo, tests and benchmarks run
on it exactly as on real data. Users have a few favourite categories; items'
popularity follows a Zipf law within and across categories; texts are built from
category-specific vocabularies so that text similarity carries signal.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson

CATEGORIES = {
    "coffee": (["espresso", "arabica", "roast", "grinder", "mug", "beans"], "Coffee"),
    "tea": (["green", "oolong", "matcha", "teapot", "infuser", "chai"], "Tea"),
    "camera": (["lens", "tripod", "mirrorless", "zoom", "flash", "sensor"], "Cameras"),
    "audio": (["headphones", "speaker", "wireless", "bass", "earbuds", "amplifier"], "Audio"),
    "garden": (["shovel", "seeds", "hose", "planter", "pruner", "compost"], "Garden"),
    "office": (["stapler", "notebook", "pen", "binder", "toner", "labeler"], "Office"),
    "kitchen": (["skillet", "knife", "blender", "kettle", "spatula", "pan"], "Kitchen"),
    "sports": (["yoga", "dumbbell", "running", "bottle", "racket", "helmet"], "Sports"),
}
ADJECTIVES = [
    "premium",
    "compact",
    "classic",
    "deluxe",
    "eco",
    "pro",
    "mini",
    "smart",
    "heavy-duty",
]
BRANDS = ["Acme", "Nordic", "Sora", "Vela", "Kappa", "Orion", "Lumen", "Terra"]


def generate(
    out: Path,
    *,
    domain: str = "shop",
    n_items: int = 2000,
    n_users: int = 1500,
    n_interactions: int = 40_000,
    seed: int = 7,
    start_ts: int = 1_700_000_000,
) -> Path:
    """Write ``items.jsonl`` and ``interactions.csv`` under ``out``; returns ``out``."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    cats = list(CATEGORIES)
    item_cat = rng.integers(0, len(cats), size=n_items)
    with (out / "items.jsonl").open("wb") as fh:
        for i in range(n_items):
            words, label = CATEGORIES[cats[item_cat[i]]]
            picked = rng.choice(words, size=2, replace=False)
            text = (
                f"{BRANDS[rng.integers(len(BRANDS))]} {ADJECTIVES[rng.integers(len(ADJECTIVES))]} "
                f"{picked[0]} {picked[1]} {label}"
            )
            fh.write(orjson.dumps({"item_id": f"i{i}", "domain": domain, "text": text}) + b"\n")
    # Zipf popularity: rank r has weight 1 / r^1.1, ranks shuffled over items.
    weight = 1.0 / np.arange(1, n_items + 1) ** 1.1
    rng.shuffle(weight)
    by_cat = [np.flatnonzero(item_cat == c) for c in range(len(cats))]
    cat_probs = [weight[idx] / weight[idx].sum() for idx in by_cat]
    user_favs = rng.integers(0, len(cats), size=(n_users, 2))
    user_activity = rng.pareto(1.5, size=n_users) + 1
    user_p = user_activity / user_activity.sum()
    users = rng.choice(n_users, size=n_interactions, p=user_p)
    ts = start_ts + np.sort(rng.integers(0, 86_400 * 90, size=n_interactions))
    with (out / "interactions.csv").open("w") as fh:
        fh.write("user_id,item_id,timestamp\n")
        for u, t in zip(users, ts, strict=True):
            c = user_favs[u, rng.integers(2)] if rng.random() < 0.85 else rng.integers(len(cats))
            item = by_cat[c][rng.choice(len(by_cat[c]), p=cat_probs[c])]
            fh.write(f"u{u},i{item},{t}\n")
    return out
