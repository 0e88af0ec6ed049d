"""Run lineage in the open-source Prefect UI: content hashes of every artefact, and assets.

The asset graph view exists only in Prefect Cloud; in the open-source UI lineage is the parent /
child flow-run graph, a lineage table artifact (artefact → path → content hash → made from), and
the `prefect.asset.*` events that `materialize` records in the Event Feed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from prefect import get_run_logger
from prefect.cache_policies import NO_CACHE


def content_hash(path: str | Path) -> str:
    """xxh3-128 of a file's bytes ('' when it does not exist)."""
    from cleaning.inputs import content_hash as hash_file

    path = Path(path)
    return hash_file(str(path))[0] if path.is_file() else ""


def _note(path: str, metadata: dict[str, Any]) -> dict[str, Any]:
    from prefect.assets import add_asset_metadata

    add_asset_metadata(Path(path).resolve().as_uri(), metadata)
    return metadata


def record_asset(path: str | Path, upstream: Sequence[str | Path], name: str, by: str,
                 metadata: dict[str, Any]) -> str | None:
    """Materialise `file://PATH` with its upstream files as a Prefect asset; returns the key."""
    from prefect.assets import Asset, AssetProperties, materialize

    key = Path(path).resolve().as_uri()
    try:
        asset = Asset(key=key, properties=AssetProperties(name=name))
        deps = [Asset(key=Path(p).resolve().as_uri()) for p in upstream]
    except ValueError as exc:  # a path with characters an asset key may not hold
        from prefect.events import emit_event

        get_run_logger().warning("%s is not a valid asset key (%s): emitting a plain event instead", key, exc)
        emit_event(f"pangu.{by}.written", resource={"prefect.resource.id": f"pangu.{by}.{Path(path).name}"},
                   payload={"path": str(path), **metadata})
        return None
    record = materialize(asset, by=by, asset_deps=deps, name=f"record-{by}", cache_policy=NO_CACHE)(_note)
    record(str(path), metadata)
    return key
