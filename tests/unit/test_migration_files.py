"""The migration files and how the runner finds them: one number line over
two tracks, baselines that cover every legacy file, a core track that needs
no role, and legacy files that never change (they identify databases the
single-track runner built)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pg_broker.migrate import CORE, LEGACY, SUPABASE, TRACKS, discover, migrations_dir

# What the single-track runner recorded for each legacy file: a database
# holding these checksums is recognised, so the files must never change.
LEGACY_CHECKSUMS = {
    1: "0ed28e35076d99cae2819d585013f31f7b03c6f8386d57a183474f020de0716d",
    2: "d30182d65144a6358b0dd70804e5b116cc8eb8fc087281a3206c917a8e2937db",
    3: "1886ac28e6bb1f9b3e3a75acef77611a117f8ff6aa82f73b74c7d24b1fa5fb34",
    4: "ecf867354c7b7e5d1c1587188e8e9aaa2a036222eeec354dcafe48ce232ca91d",
    5: "fcf3e6fe1ff8d4cf7ba7c0b0944f54212bb75ad9112311008ebef4177353ef0a",
    6: "06c20ee583f9bb0d00d298de9bd3386e28dd9d20226876f7a6aa33cbc6808901",
    7: "2e094b8616dc057b4e9be9484160d0ddf1a46930013fd640b6afcdaf419c4572",
    8: "76417efddbac0eb19de4dadd45a75d2ac093d998e2f3ad2d6dbd43586b11d2d3",
    10: "bd3eb9590c46e8696812c44e63379c5bf4d022074f92da4bed66aaaf38934bcd",
    11: "98befb3d71b3437c6dc34b9a1690636c3166288130c5dc3ed5ebe8078dd07a94",
    12: "5e015cbdd78f631494f8864e1e61829eedfc8ca43f91e5f742e6f5b4479ccd03",
}
# What only the Supabase layer may do or name.
LAYER_ONLY = re.compile(
    r"\b(anon|authenticated|service_role|auth\.|CREATE ROLE|CREATE SCHEMA|CREATE POLICY"
    r"|ROW LEVEL SECURITY|GRANT\b)", re.IGNORECASE)


def _code(sql: str) -> str:
    """The SQL without its comments."""
    return "\n".join(line.split("--", 1)[0] for line in sql.splitlines())


def test_the_tracks_share_one_number_line_starting_with_the_two_baselines() -> None:
    found = discover()
    assert {m.track for m in found} == set(TRACKS)
    assert [m.version for m in found] == sorted({m.version for m in found})
    first_core = next(m for m in found if m.track == CORE)
    first_layer = next(m for m in found if m.track == SUPABASE)
    assert first_core.version < first_layer.version
    assert first_core.legacy_versions and first_layer.legacy_versions


def test_every_legacy_file_is_covered_by_a_baseline_and_nothing_else_is_claimed() -> None:
    legacy = {m.version for m in discover(tracks=(LEGACY,))}
    claimed = {v for m in discover() for v in m.legacy_versions}
    assert claimed == legacy


def test_the_legacy_files_never_change() -> None:
    assert {m.version: m.checksum for m in discover(tracks=(LEGACY,))} == LEGACY_CHECKSUMS


@pytest.mark.parametrize("migration", discover(tracks=(CORE,)), ids=lambda m: m.label)
def test_a_core_file_names_no_role_and_creates_no_role_schema_or_policy(migration) -> None:
    assert LAYER_ONLY.findall(_code(migration.sql)) == []


def test_the_layer_is_where_roles_policies_and_grants_are() -> None:
    layer = " ".join(_code(m.sql) for m in discover(tracks=(SUPABASE,)))
    for needed in ("CREATE ROLE", "auth.uid()", "CREATE POLICY", "FORCE ROW LEVEL SECURITY",
                   "GRANT"):
        assert needed in layer


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_discovery_orders_both_tracks_by_number_and_reads_legacy_headers(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "core/100_base.sql": "-- legacy: 001 002\nSELECT 1;\n",
        "supabase/101_layer.sql": "-- a comment\n-- legacy: 003\nSELECT 2;\n",
        "core/102_next.sql": "SELECT 3; -- legacy: 004 is no header\n",
        "legacy/001_old.sql": "SELECT 0;\n",
    })
    found = discover(root)
    assert [(m.track, m.version, m.name) for m in found] == [
        ("core", 100, "base"), ("supabase", 101, "layer"), ("core", 102, "next")]
    assert [m.legacy_versions for m in found] == [(1, 2), (3,), ()]
    assert [m.label for m in discover(root, (LEGACY,))] == ["legacy/001_old.sql"]


def test_a_number_used_in_both_tracks_is_refused(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"core/102_a.sql": "", "supabase/102_b.sql": ""})
    with pytest.raises(ValueError, match="two migrations share the number 102"):
        discover(root)


@pytest.mark.parametrize("name", ["core/099_early.sql", "legacy/100_late.sql"])
def test_a_file_numbered_on_the_wrong_side_of_100_is_refused(tmp_path: Path, name: str) -> None:
    root = _tree(tmp_path, {name: ""})
    with pytest.raises(ValueError, match="legacy files are numbered below 100"):
        discover(root, (CORE, LEGACY))


def test_a_file_not_named_nnn_name_is_refused(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"core/1_first.sql": ""})
    with pytest.raises(ValueError, match="core/1_first.sql is not named NNN_name.sql"):
        discover(root)


def test_the_migrations_come_from_the_environment_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PG_BROKER_MIGRATIONS_DIR", str(tmp_path))
    assert migrations_dir() == tmp_path
    monkeypatch.delenv("PG_BROKER_MIGRATIONS_DIR")
    assert (migrations_dir() / CORE).is_dir()
