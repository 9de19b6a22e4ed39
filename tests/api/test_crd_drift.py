"""The CRDs in crds/ are generated from the pydantic models and must not drift."""

from __future__ import annotations

from pathlib import Path

from controller.api import crdgen

CRDS = Path(__file__).resolve().parents[2] / "crds"


def test_committed_crds_match_the_models(tmp_path: Path) -> None:
    assert crdgen.main(["--out", str(CRDS), "--check"]) == 0


def test_check_fails_when_a_crd_is_edited(tmp_path: Path) -> None:
    crdgen.main(["--out", str(tmp_path)])
    (name,) = [p for p in tmp_path.iterdir() if "zmachines" in p.name]
    name.write_text(name.read_text().replace("minimum: 1", "minimum: 0"))
    assert crdgen.main(["--out", str(tmp_path), "--check"]) == 1


def test_schema_has_no_refs_or_unions() -> None:
    text = "".join(crdgen.render_all().values())
    for forbidden in ("$ref", "anyOf", "allOf", "title:"):
        assert forbidden not in text
