"""`workbench demo --no-app`, end to end, on a small cohort: what `make demo` runs.

Synthesise, ingest, train (with calibration, conformal sets, the OOD model and the saliency
checks), predict with Grad-CAM, report, and create the demo account: every step the README's
first command takes, in about half a minute (40 studies, one epoch at 48 px).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from tests.conftest import make_settings, run_cli
from workbench.review import users

DEMO_PASSWORD = "demo-fixture-password"  # test fixture only, not a secret


def test_the_demo_runs_every_step_from_an_empty_home(tmp_path: Path) -> None:
    home = tmp_path / "home"
    settings = make_settings(home)
    r = run_cli(
        ["demo", "--no-app", "--studies", "40", "--epochs", "1", "--image-size", "48"],
        home,
        WORKBENCH_DEMO_PASSWORD=DEMO_PASSWORD,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line for line in r.stdout.splitlines() if line.startswith("[demo]")]
    assert any("synthesised 40 studies (80 files)" in line for line in lines), lines
    assert any("ingested 80" in line and "quarantined 0" in line for line in lines), lines
    assert any("pipeline took" in line for line in lines), lines

    bundle = home / "models" / "chest-xray" / "v1"
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    wb = meta["workbench"]
    assert wb["calibration"]["method"] in ("none", "temperature", "sigmoid", "isotonic")
    # conformal sets need a larger calibration split than 40 studies give: recorded as absent
    assert wb["trust"]["ood"]["threshold"] is not None and "conformal" in wb["trust"]
    assert "saliency_checks" in wb["trust"]
    # Grad-CAM's grid is recorded for the app (at 96 px: denseblock3, 6 x 6)
    gradcam = wb["trust"]["saliency_checks"]["gradcam"]
    assert gradcam["layer"].startswith("features.") and len(gradcam["grid"]) == 2

    reports = home / "reports" / "demo"
    with (reports / "predictions.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert rows and all(row["study_key"].startswith("S") for row in rows)
    report = json.loads((reports / "report.json").read_text())
    assert report["performance"]["n"] == len(rows)
    assert (reports / "report.html").stat().st_size > 0 and (reports / "report.pdf").exists()

    account = users.authenticate(settings, "demo", DEMO_PASSWORD)
    assert account.role == "clinician"
    assert DEMO_PASSWORD not in r.stdout  # a password from the environment is never echoed
