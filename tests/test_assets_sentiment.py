"""The bundled sentiment data (scripts/build_assets.py sentiment): what its manifest says is true of
the files, no movie is in two splits, no text in two splits, and both labels are present."""

import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1] / "distill" / "assets" / "sentiment"


def test_sentiment_asset_matches_its_manifest_and_splits_by_movie():
    manifest = json.loads((ROOT / "manifest.json").read_text())
    assert "Apache License" in (ROOT / manifest["license"]).read_text()
    movies, texts = {}, {}
    for split, info in manifest["splits"].items():
        path = ROOT / f"{split}.parquet"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == info["sha256"]
        table = pq.read_table(path).to_pylist()
        assert len(table) == info["rows"] and sum(r["label"] == "fresh" for r in table) == info["fresh"]
        assert {r["label"] for r in table} == set(manifest["labels"])
        assert all(r["text"].strip() == r["text"] and r["text"] for r in table)
        movies[split] = {r["movie"] for r in table}
        texts[split] = {r["text"] for r in table}
        assert len(texts[split]) == len(table)  # no duplicates
    assert not movies["train"] & movies["test"] and not movies["train"] & movies["eval"]
    assert not movies["eval"] & movies["test"]
    assert not texts["train"] & texts["test"]
    assert sum(i["rows"] for i in manifest["splits"].values()) > 12000
